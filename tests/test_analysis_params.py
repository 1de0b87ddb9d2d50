"""Parameter counts: closed form vs the built model, and vs the makers' published figures.

Each published figure is quoted with its source and checked to the precision it is stated in.
"""

from __future__ import annotations

import math

import pytest
import torch

import giants
from giants.analysis.params import COMPONENTS, count_params, measure_params
from giants.presets import PRESETS, TINY_PRESETS, get_config

B = 10**9
M = 10**6


def _round(x: float, unit: float, digits: int) -> float:
    return round(x / unit, digits)


# ---- closed form == the model ------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_closed_form_matches_meta_model_per_component(name):
    cfg = get_config(name)
    model = giants.build(cfg, device="meta")
    measured = measure_params(model.named_parameters())
    pc = count_params(cfg)
    assert measured == pc.components(), name
    assert sum(measured.values()) == pc.total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_twins_numel_equals_prediction(name):
    model = giants.build(get_config(name), seed=0)
    assert sum(p.numel() for p in model.parameters()) == count_params(model.config).total
    assert set(COMPONENTS) == set(count_params(model.config).components())


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-gpt-oss"])
def test_active_expert_params_are_what_one_token_touches(name):
    """Backprop one token: exactly the routed experts' weights get a gradient, which is `active_mlp`."""
    cfg = get_config(name)
    model = giants.build(cfg, seed=0, dtype=torch.float64)
    ids = torch.tensor([[123]])
    model(ids).sum().backward()
    touched = sum(int((p.grad != 0).sum()) for n, p in model.named_parameters()
                  if ".mlp." in n and ".router." not in n and p.grad is not None)
    assert touched == count_params(cfg).active_mlp
    assert count_params(cfg).active_mlp == cfg.experts_per_token * count_params(cfg).expert


# ---- published figures -------------------------------------------------------------------------

def test_gpt_oss_120b_model_card():
    # gpt-oss-120b & gpt-oss-20b Model Card (OpenAI, Aug 2025, arXiv:2508.10925), Table 1: total 116.83B,
    # active 5.13B (the card's active count leaves out the input embedding table), and the
    # components MLP 114.71B, attention 0.96B, embed + unembed 1.16B (2 decimals in billions).
    pc = count_params(get_config("gpt-oss-120b"))
    assert _round(pc.total, B, 2) == 116.83
    assert _round(pc.active, B, 2) == 5.13
    assert _round(pc.mlp + pc.router, B, 2) == 114.71
    assert _round(pc.attention, B, 2) == 0.96
    assert _round(pc.embedding + pc.unembedding, B, 2) == 1.16


def test_gpt_oss_20b_model_card():
    # Same model card, Table 1: total 20.91B, active 3.61B, MLP 19.12B, attention 0.64B, embed + unembed 1.16B.
    pc = count_params(get_config("gpt-oss-20b"))
    assert _round(pc.total, B, 2) == 20.91
    assert _round(pc.active, B, 2) == 3.61
    assert _round(pc.mlp + pc.router, B, 2) == 19.12
    assert _round(pc.attention, B, 2) == 0.64
    assert _round(pc.embedding + pc.unembedding, B, 2) == 1.16


def test_mixtral_8x22b_announcement():
    # Mistral AI, "Cheaper, Better, Faster, Stronger" (Mixtral 8x22B release, 17 Apr 2024): "a sparse
    # Mixture-of-Experts model that uses only 39B active parameters out of 141B" (whole billions).
    pc = count_params(get_config("mixtral-8x22b"))
    assert _round(pc.total, B, 0) == 141
    assert _round(pc.active_with_embedding, B, 0) == 39
    assert _round(pc.active, B, 0) == 39  # the figure is too coarse to tell the two conventions apart


def test_mixtral_8x7b_announcement_counts_the_embedding():
    # Mistral AI, "Mixtral of experts" (11 Dec 2023): "46.7B total parameters but only uses 12.9B parameters
    # per token". 12.9B is the active count WITH the input embedding (12.88B); without it is 12.75B.
    # Mixtral paper (arXiv:2401.04088): "access to 47B parameters, but only uses 13B active parameters".
    pc = count_params(get_config("mixtral-8x7b"))
    assert _round(pc.total, B, 1) == 46.7
    assert _round(pc.active_with_embedding, B, 1) == 12.9
    assert _round(pc.active, B, 1) == 12.7  # so Mistral's convention includes the embedding
    assert _round(pc.total, B, 0) == 47 and _round(pc.active_with_embedding, B, 0) == 13
    # Exact: mistralai/Mixtral-8x7B-v0.1 model.safetensors.index.json metadata.total_size = 93405585408 bytes (bf16).
    assert 2 * pc.total == 93_405_585_408


def test_llama_3_70b():
    # Meta Llama 3 model card: "70B"; exact: the 70B checkpoints' model.safetensors.index.json
    # metadata.total_size = 141107412992 bytes of bf16 (Llama 3 and 3.1 70B share every shape).
    pc = count_params(get_config("llama-3-70b"))
    assert 2 * pc.total == 141_107_412_992
    assert math.floor(pc.total / B) == 70


def test_llama_3_1_8b():
    # Meta Llama 3.1 model card: "8B"; exact: meta-llama/Llama-3.1-8B (and Meta-Llama-3-8B)
    # model.safetensors.index.json metadata.total_size = 16060522496 bytes of bf16.
    pc = count_params(get_config("llama-3.1-8b"))
    assert 2 * pc.total == 16_060_522_496
    assert _round(pc.total, B, 0) == 8


def test_llama_3_2_1b():
    # Llama 3.2 model card, "Model Information" table: "1B (1.23B)" with shared (tied) embeddings.
    # The exact count is 1,235,814,400: the card truncates to 2 decimals (the 3B's "3.21B" is 3,212,749,824).
    pc = count_params(get_config("llama-3.2-1b"))
    assert math.floor(pc.total / 1e7) / 100 == 1.23
    assert pc.unembedding == 0 and pc.total == 1_235_814_400


def test_smollm2_135m():
    # HuggingFaceTB/SmolLM2-135M-Instruct model card: "135M parameters".
    assert _round(count_params(get_config("smollm2-135m")).total, M, 0) == 135


@pytest.mark.parametrize("name,embedding,non_embedding", [
    ("gemma-2-2b", 590_118_912, 2_024_517_888),
    ("gemma-2-9b", 917_962_752, 8_324_201_984),
    ("gemma-2-27b", 1_180_237_824, 26_047_480_320),
])
def test_gemma_2_paper_table(name, embedding, non_embedding):
    # Gemma 2 technical report (arXiv:2408.00118), Table 2 "Parameter counts": embedding and non-embedding
    # parameters, exact. Non-embedding matches to the parameter. The paper's embedding figure is a
    # 256,128-row table (vocabulary padded by 128 rows); the released checkpoints hold 256,000 rows.
    cfg = get_config(name)
    pc = count_params(cfg)
    assert pc.non_embedding == non_embedding
    assert embedding == (cfg.vocab_size + 128) * cfg.d_model
    assert pc.embedding == cfg.vocab_size * cfg.d_model and pc.unembedding == 0  # tied


def test_described_gpt_oss_is_a_dense_120b():
    pc = count_params(get_config("gpt-oss-120b-described"))
    assert pc.active_with_embedding == pc.total and _round(pc.total, B, 0) == 122


def test_mixtral_expert_is_not_22b():
    pc = count_params(get_config("mixtral-8x22b"))
    assert _round(pc.expert, B, 1) == 16.9  # one expert's FFN across 56 layers
    assert _round(pc.shared, B, 1) == 5.3
    assert _round(pc.shared + pc.expert, B, 0) == 22  # "22B" is the one-expert model
    assert pc.shared + 8 * pc.expert == pc.total
