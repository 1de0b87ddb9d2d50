"""Print pip constraints (name==version) for the accelerator stack installed in this Python: torch and its
companions, Triton, and the nvidia-*/cuda-* wheels. `make test-gpu` installs the test dependencies under these
constraints, so a GPU machine's own CUDA build of torch is kept, never replaced by a download."""

from __future__ import annotations

import re
from importlib import metadata

NAMES = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton(-\w+)?|nvidia-.*|cuda-.*)$")


def main() -> None:
    seen = set()
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        if NAMES.match(name) and name not in seen:
            seen.add(name)
            print(f"{name}=={dist.version}")


if __name__ == "__main__":
    main()
