"""Before anything big is allocated: will the model fit, and where do real weights come from?

`giants generate llama-3.1-8b` used to build 32 GB of random fp32 weights on a 24 GB machine and end in an
allocator traceback; `giants generate llama-3.2-1b` built 5 GB of random weights for a minute and then said it had
no tokenizer. Here the estimate is compared with the memory available before the first byte is allocated, and
a name that is only a preset (or a Hugging Face Hub id) gets told how to fetch real weights.

GIANTS_SKIP_MEMORY_CHECK=1 turns the memory check off (swap, or an estimate that is wrong for your machine).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from giants.config import ModelConfig

KV_BUDGET_CPU = 1 << 30  # Engine._kv_budget on the CPU
WORKSPACE = 512 << 20  # activations, logits, the Python runtime's share


def hub_id(text: str) -> str | None:
    """'owner/name' when `text` (a preset's source, a model argument) names a Hugging Face Hub repository."""
    first = text.split()[0] if text.split() else ""
    parts = first.split("/")
    if len(parts) == 2 and all(parts) and not first.startswith((".", "/", "~")) and not first.endswith(".json"):
        return first
    return None


def real_weights_hint(name: str) -> str:
    """How to get real weights for a preset name or a Hub id: one or two sentences."""
    from giants.presets import PRESETS

    repo = hub_id(PRESETS[name].source) if name in PRESETS else hub_id(name)
    folder = (repo or name).split("/")[-1]
    parts = []
    if repo:
        parts.append(f"download {repo} from the Hugging Face Hub (`hf download {repo} --local-dir {folder}`; gated "
                     f"models need `hf auth login` first) or a .gguf file of it, then pass the folder or file: "
                     f"`giants generate ./{folder} \"...\"`")
    parts.append("`giants download smollm2-135m` fetches a small real model (98 MB) that runs on a laptop CPU")
    return "For real weights: " + "; ".join(parts) + "."


def random_weights_note(name: str) -> str:
    from giants.presets import PRESETS

    src = PRESETS[name].source if name in PRESETS else ""
    shape = f" (the shape of {hub_id(src)})" if hub_id(src) else ""
    return (f"{name} is a preset{shape} with RANDOM weights: its output is noise, useful for sizes and speed only. "
            + real_weights_hint(name))


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated on `device` now (MemAvailable on the host)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return 1 << 62


def estimate_bytes(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, packed: bool = False) -> int:
    """Weights in `dtype` (+ the oneDNN-packed copy of the CPU fp32 projections when `packed`), the KV cache
    budget and a workspace."""
    from giants.analysis.params import count_params

    pc = count_params(cfg)
    size = torch.empty((), dtype=dtype).element_size()
    need = pc.total * size + WORKSPACE
    if packed:
        need += (pc.total - pc.embedding + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)) * size
    if device.type == "cpu":
        need += KV_BUDGET_CPU
    return int(need)


def check_memory(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, what: str, packed: bool = False,
                 hint: str = "") -> None:
    """ValueError (one line, no allocation) when the estimate exceeds what `device` has available."""
    if os.environ.get("GIANTS_SKIP_MEMORY_CHECK") or device.type not in ("cpu", "cuda"):
        return
    if device.type == "cuda" and not torch.cuda.is_available():
        return
    need, have = estimate_bytes(cfg, dtype, device, packed), available_memory(device)
    if need <= have:
        return
    dt = str(dtype).replace("torch.", "")
    smaller = ""
    if dtype == torch.float32:
        half = estimate_bytes(cfg, torch.bfloat16, device, False)
        smaller = (f" --dtype bfloat16 would need about {half / 2**30:.1f} GiB"
                   + ("." if half <= have else ", still too much."))
    raise MemoryError(f"{what} needs about {need / 2**30:.1f} GiB in {dt} on {device.type} (weights "
                      f"{_params(cfg)} parameters, KV cache and workspace) and {have / 2**30:.1f} GiB is available."
                      f"{smaller}{(' ' + hint) if hint else ''} (GIANTS_SKIP_MEMORY_CHECK=1 skips this check.)")


def _params(cfg: ModelConfig) -> str:
    from giants.analysis.params import count_params
    from giants.analysis.tables import human_count

    return human_count(count_params(cfg).total)


def check_device(device: torch.device) -> None:
    """A CUDA device on an install or machine without one: say so in a line (torch raises an AssertionError
    from deep inside the first allocation)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        build = torch.__version__
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, driver?)")
        raise ValueError(f"device: {str(device)!r} asked for, but {why} (torch {build}); use --device cpu, or "
                         "install a CUDA build of torch on a machine with a GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
