"""Test helpers: tiny random transformers models built from a giants config, saved to disk."""

from __future__ import annotations

from pathlib import Path

import torch

from giants.config import ModelConfig

PARITY_ATOL = 1e-4  # max |logits difference| against transformers

# The parity regime (active=True): weights scaled so that every feature of every family moves the logits far
# beyond PARITY_ATOL (tests/test_parity_sensitivity.py checks each one). At the plain init (std 0.05) attention is
# nearly uniform and activations small: Gemma 2's attention soft-cap (50) moved the logits by 7e-6, its final
# soft-cap (30) by 4e-3 and gpt-oss's SwiGLU clamp (+-7) by exactly 0, so a parity test at 1e-4 passed with or
# without them.
QK_SCALE = 8.0  # q/k projections std 0.4: attention scores reach tens (the 50 soft-cap bends them)
EMBED_SCALE = 4.0  # embedding / head std 0.2: logits reach ~10 (the 30 final soft-cap bends them)
MLP_SCALE = 10.0  # gate / up projections std 0.5: clamped SwiGLU's limit of 7 clips


def hf_model_from_config(cfg: ModelConfig, seed: int = 0, *, active: bool = False):
    """A transformers model of cfg with random weights; active=True: the parity regime above."""
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
        if active:
            for name, p in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(QK_SCALE)
                elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                    p.mul_(EMBED_SCALE)
                elif name.endswith(("gate_proj.weight", "up_proj.weight", "experts.gate_up_proj")):
                    p.mul_(MLP_SCALE)
    return model.eval().float()


def parity_weights(cfg: ModelConfig, path: Path) -> tuple[object, dict[str, torch.Tensor]]:
    """(the transformers model in the parity regime, its weights under giants' names), through a saved checkpoint
    (the names transformers writes, which its in-memory MoE names are not)."""
    from giants.checkpoint.hf_map import hf_to_giants

    hf = hf_model_from_config(cfg, active=True)
    save_hf(hf, path)
    return hf, dict(hf_to_giants(load_hf_safetensors(path), cfg))


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def load_hf_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out
