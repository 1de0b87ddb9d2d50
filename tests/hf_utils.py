"""Test helpers: tiny random transformers models built from a giants config, saved to disk."""

from __future__ import annotations

from pathlib import Path

import torch

from giants.config import ModelConfig


def hf_model_from_config(cfg: ModelConfig, seed: int = 0):
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    with torch.no_grad():
        # Random non-trivial values everywhere, norms and sinks and biases included, so a mis-mapped
        # tensor cannot hide behind an identity or zero initialisation.
        for name, p in model.named_parameters():
            if "norm" in name:
                offset = 0.0 if cfg.norm_kind == "rmsnorm_plus_one" else 1.0
                p.copy_(offset + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05 if p.dim() > 1 else 0.1)
    return model.eval().float()


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def load_hf_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out
