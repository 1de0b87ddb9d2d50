"""GGUF in: dequantization of every supported type against an independent implementation, and each family
written the way llama.cpp's convert_hf_to_gguf.py writes it, loaded back to the same logits."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import giants
from giants import get_config
from giants.checkpoint import CheckpointError, load, mxfp4
from giants.checkpoint.gguf_io import GGUFFile, dequantize_tensor, open_gguf

# ---- a GGUF writer that follows llama.cpp's converter --------------------------------------------


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.LlamaModel.permute: interleave the two rotary halves of each head's rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(cfg) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.generate_extra_tensors: per-frequency divisors, written as rope_freqs."""
    import math

    base, dim = cfg.rope_theta, cfg.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high, old = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, \
        cfg.rope_original_max_context
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(model, path: Path, arch: str, qtype=Q.F32, overrides: dict[str, Q] | None = None) -> Path:
    cfg = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", cfg.n_layers)
    w.add_uint32(f"{arch}.context_length", cfg.max_context)
    w.add_uint32(f"{arch}.embedding_length", cfg.d_model)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.ffn_dim)
    w.add_uint32(f"{arch}.attention.head_count", cfg.n_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.n_kv_heads)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    w.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
    w.add_uint32(f"{arch}.attention.value_length", cfg.head_dim)
    if arch == "llama":
        w.add_uint32(f"{arch}.rope.dimension_count", cfg.head_dim)
    if cfg.is_moe:
        w.add_uint32(f"{arch}.expert_count", cfg.n_experts)
        w.add_uint32(f"{arch}.expert_used_count", cfg.experts_per_token)
        if arch == "gpt-oss":
            w.add_uint32(f"{arch}.expert_feed_forward_length", cfg.ffn_dim)
    if any(cfg.windows):
        w.add_uint32(f"{arch}.attention.sliding_window", max(cfg.windows))
    if arch == "gemma2":
        w.add_float32(f"{arch}.attn_logit_softcapping", cfg.attn_softcap)
        w.add_float32(f"{arch}.final_logit_softcapping", cfg.final_softcap)
    if cfg.rope_scaling == "yarn":
        w.add_string(f"{arch}.rope.scaling.type", "yarn")
        w.add_float32(f"{arch}.rope.scaling.factor", cfg.rope_factor)
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", cfg.rope_original_max_context)
    w.add_uint32("tokenizer.ggml.bos_token_id", cfg.bos_token_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", cfg.eos_token_id)
    w.add_uint32("tokenizer.ggml.padding_token_id", cfg.pad_token_id)

    def put(name: str, t: torch.Tensor, norm: bool = False) -> None:
        arr = t.numpy().astype(np.float32)
        if norm and arch.startswith("gemma"):
            arr = arr + 1  # llama.cpp folds Gemma's (1 + w) into the stored norm weight
        q = (overrides or {}).get(name, qtype if arr.ndim >= 2 else Q.F32)
        if q == Q.F32:
            w.add_tensor(name, arr)
        elif q in (Q.F16,):
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, q), raw_dtype=q)

    put("token_embd.weight", sd["embed.weight"])
    put("output_norm.weight", sd["norm.weight"], norm=True)
    if "lm_head.weight" in sd:
        put("output.weight", sd["lm_head.weight"])
    if cfg.rope_scaling == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_freqs(cfg))
    for i in range(cfg.n_layers):
        o, b = f"layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", sd[o + "attn_norm.weight"], norm=True)
        for ours, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
            for kind in ("weight", "bias"):
                key = f"{o}attn.{ours}.{kind}"
                if key not in sd:
                    continue
                t = sd[key]
                if arch == "llama" and ours in ("q_proj", "k_proj"):
                    t = _permute(t, cfg.n_heads if ours == "q_proj" else cfg.n_kv_heads)
                put(f"{b}{g}.{kind}", t)
        if cfg.attn_sinks:
            put(b + "attn_sinks.weight", sd[o + "attn.sinks"])
        if arch == "gemma2":
            put(b + "post_attention_norm.weight", sd[o + "attn_post_norm.weight"], norm=True)
            put(b + "ffn_norm.weight", sd[o + "mlp_norm.weight"], norm=True)
            put(b + "post_ffw_norm.weight", sd[o + "mlp_post_norm.weight"], norm=True)
        elif arch == "gpt-oss":
            put(b + "post_attention_norm.weight", sd[o + "mlp_norm.weight"])
        else:
            put(b + "ffn_norm.weight", sd[o + "mlp_norm.weight"], norm=True)
        if not cfg.is_moe:
            for ours, g in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                put(f"{b}{g}.weight", sd[f"{o}mlp.{ours}.weight"])
            continue
        put(b + "ffn_gate_inp.weight", sd[o + "mlp.router.weight"])
        if cfg.router_bias:
            put(b + "ffn_gate_inp.bias", sd[o + "mlp.router.bias"])
        for g in ("gate", "up", "down"):
            put(f"{b}ffn_{g}_exps.weight", sd[f"{o}mlp.w_{g}"])
            if cfg.mlp_bias:
                put(f"{b}ffn_{g}_exps.bias", sd[f"{o}mlp.b_{g}"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_model(cfg, seed=0):
    model = giants.build(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            base = 1.0 if ("norm" in n and cfg.norm_kind != "rmsnorm_plus_one") else 0.0
            p.copy_(base + (0.1 if p.dim() < 2 else 0.05) * torch.randn(p.shape, generator=g))
    return model


def _ids(cfg, T=40):
    return torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))


# ---- dequantization -------------------------------------------------------------------------------
_LAYOUT = {  # block bytes, offsets of fp16 scale fields (kept finite and small)
    Q.Q8_0: (34, (0,)), Q.Q4_0: (18, (0,)), Q.Q4_1: (20, (0, 2)), Q.Q4_K: (144, (0, 2)),
    Q.Q5_K: (176, (0, 2)), Q.Q6_K: (210, (208,)), Q.Q2_K: (84, (80, 82)), Q.Q3_K: (110, (108,)),
    Q.Q5_0: (22, (0,)), Q.Q5_1: (24, (0, 2)),
}


def _q5_reference(raw: np.ndarray, q: Q) -> torch.Tensor:
    """ggml's dequantize_row_q5_0 / q5_1 written out (transformers has no Q5_0/Q5_1 to compare with): per
    32-block an fp16 scale d (and, for Q5_1, an fp16 minimum m), 32 high bits qh, and 16 bytes of low nibbles;
    element j < 16 is the low nibble of byte j, element j + 16 its high nibble, each with bit j (j + 16) of qh
    on top; Q5_0 centres at 16 (x = (q - 16) d), Q5_1 adds the minimum (x = q d + m)."""
    nbytes = _LAYOUT[q][0]
    blocks = raw.reshape(-1, nbytes)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)
    off = 4 if q == Q.Q5_1 else 2
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float64) if q == Q.Q5_1 else None
    qh = blocks[:, off:off + 4].copy().view("<u4").astype(np.int64)
    qs = blocks[:, off + 4:off + 20].astype(np.int64)
    out = np.zeros((blocks.shape[0], 32))
    for j in range(16):
        lo = (qs[:, j] & 0xF) | (((qh[:, 0] >> j) & 1) << 4)
        hi = (qs[:, j] >> 4) | (((qh[:, 0] >> (j + 16)) & 1) << 4)
        for k, v in ((j, lo), (j + 16, hi)):
            out[:, k] = ((v - 16) * d[:, 0]) if m is None else (v * d[:, 0] + m[:, 0])
    return torch.from_numpy(out.astype(np.float32))


def _random_blocks(q: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    nbytes, halves = _LAYOUT[q]
    block = gguf.GGML_QUANT_SIZES[q][0]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    for off in halves:
        raw[..., off:off + 2] = rng.uniform(-0.02, 0.02, size=raw.shape[:2]).astype(np.float16)[..., None].view(
            np.uint8)
    return raw.reshape(rows, cols // block * nbytes)


def test_dequantize_every_type_matches_independent_reference(tmp_path):
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    rng = np.random.default_rng(0)
    rows, cols = 8, 512
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    dense = rng.standard_normal((rows, cols)).astype(np.float32)
    w.add_tensor("f32", dense)
    w.add_tensor("f16", dense.astype(np.float16))
    w.add_tensor("bf16", gguf.quants.quantize(dense, Q.BF16), raw_dtype=Q.BF16)
    raws = {q: _random_blocks(q, rows, cols, rng) for q in _LAYOUT}
    for q, raw in raws.items():
        w.add_tensor(q.name, raw, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = open_gguf(tmp_path / "q.gguf")
    got = {t.name: dequantize_tensor(t, "q.gguf") for t in reader.tensors}
    assert torch.equal(got["f32"], torch.from_numpy(dense))
    assert torch.equal(got["f16"], torch.from_numpy(dense.astype(np.float16).astype(np.float32)))
    bf = torch.from_numpy(dense).to(torch.bfloat16).float()
    assert torch.equal(got["bf16"], bf)
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K} <= {
        t.tensor_type for t in reader.tensors}  # the list, at least
    for q, raw in raws.items():
        if q in (Q.Q5_0, Q.Q5_1):
            ref = _q5_reference(raw, q).reshape(rows, cols)
        else:
            ref = hf_dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(q)).reshape(rows, cols)
        assert got[q.name].shape == (rows, cols)
        torch.testing.assert_close(got[q.name], ref, rtol=1e-6, atol=1e-6, msg=q.name)
        assert got[q.name].abs().max() > 0


# ---- families -------------------------------------------------------------------------------------
def test_llama_gguf_f32_undoes_permutation_and_rope_freqs(tmp_path):
    cfg = get_config("tiny-llama")  # GQA + llama3 rope scaling (stored by llama.cpp as rope_freqs)
    model = random_model(cfg)
    path = write_gguf(model, tmp_path / "l.gguf", "llama")
    ours = load(path)
    assert ours.config == cfg.replace(norm_eps=ours.config.norm_eps)
    for k, v in model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    with torch.no_grad():
        assert (ours(_ids(cfg)) - model(_ids(cfg))).abs().max().item() <= 1e-5


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_quantized_llama_gguf_matches_transformers(tmp_path, qtype):
    import transformers

    cfg = get_config("tiny-llama").replace(rope_scaling="none", rope_factor=1.0)  # transformers ignores rope_freqs
    path = write_gguf(random_model(cfg), tmp_path / "q.gguf", "llama", qtype,
                      overrides={"token_embd.weight": Q.F16})
    ours = load(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        assert (ours(_ids(cfg)) - ref(_ids(cfg)).logits).abs().max().item() <= 1e-4
    assert GGUFFile(path).qtype("blk.0.attn_q.weight") == qtype.name


def test_gemma2_gguf_matches_model_and_transformers(tmp_path):
    import transformers

    # Neither llama.cpp nor its GGUF metadata carry query_pre_attn_scalar: llama.cpp uses head_dim (and
    # d_model / n_heads for 27B), transformers Gemma2Config's default 256. They agree at head_dim 256.
    cfg = get_config("tiny-gemma2").replace(head_dim=256, query_scale=256.0)
    model = random_model(cfg)
    path = write_gguf(model, tmp_path / "g.gguf", "gemma2")
    ours = load(path)
    assert ours.config == cfg.replace(norm_eps=ours.config.norm_eps, max_context=ours.config.max_context)
    ids = _ids(cfg)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="g.gguf", dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        want = model(ids)
        assert (ours(ids) - want).abs().max().item() <= 1e-5
        assert (ref(ids).logits - want).abs().max().item() <= 1e-4


def test_gemma_v1_gguf(tmp_path):
    # Gemma 1: Gemma's GeGLU, (1 + w) norms and sqrt(d) embedding scale, without Gemma 2's extra norms,
    # soft-caps and windows.
    cfg = get_config("tiny-gemma2").replace(post_norms=False, attn_softcap=None, final_softcap=None,
                                            layer_windows=(), query_scale=16.0)
    model = random_model(cfg)
    ours = load(write_gguf(model, tmp_path / "g1.gguf", "gemma"))
    assert ours.config == cfg.replace(norm_eps=ours.config.norm_eps)
    with torch.no_grad():
        assert (ours(_ids(cfg)) - model(_ids(cfg))).abs().max().item() <= 1e-5


def test_mixtral_style_llama_moe_gguf(tmp_path):
    cfg = get_config("tiny-mixtral").replace(layer_windows=())  # llama.cpp's llama arch has no window
    model = random_model(cfg)
    ours = load(write_gguf(model, tmp_path / "m.gguf", "llama"))
    assert ours.config.n_experts == 8 and ours.config.experts_per_token == 2
    with torch.no_grad():
        assert (ours(_ids(cfg)) - model(_ids(cfg))).abs().max().item() <= 1e-5


def test_gpt_oss_gguf_with_mxfp4_experts(tmp_path):
    cfg = get_config("tiny-gpt-oss")
    model = random_model(cfg)
    with torch.no_grad():  # put expert weights on the MXFP4 grid so storing them is lossless
        for layer in model.layers:
            for name in ("w_gate", "w_up", "w_down"):
                p = getattr(layer.mlp, name)  # (E, out, in): blocks run along `in`
                p.copy_(mxfp4.dequantize(*mxfp4.quantize(p.transpose(1, 2))).transpose(1, 2))
    mx = {f"blk.{i}.ffn_{g}_exps.weight": Q.MXFP4 for i in range(cfg.n_layers) for g in ("gate", "up", "down")}
    path = write_gguf(model, tmp_path / "o.gguf", "gpt-oss", overrides=mx)
    assert GGUFFile(path).qtype("blk.0.ffn_gate_exps.weight") == "MXFP4"
    ours = load(path)
    assert ours.config == cfg.replace(norm_eps=ours.config.norm_eps, max_context=ours.config.max_context,
                                      swiglu_alpha=ours.config.swiglu_alpha)
    for k, v in model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    with torch.no_grad():
        assert (ours(_ids(cfg)) - model(_ids(cfg))).abs().max().item() <= 1e-5


def test_qwen2_style_bias_gguf(tmp_path):
    cfg = get_config("tiny-llama").replace(rope_scaling="none", rope_factor=1.0, attn_qkv_bias=True)
    model = random_model(cfg)
    ours = load(write_gguf(model, tmp_path / "q.gguf", "qwen2"))
    assert ours.config.attn_qkv_bias and not ours.config.attn_out_bias
    with torch.no_grad():
        assert (ours(_ids(cfg)) - model(_ids(cfg))).abs().max().item() <= 1e-5


def test_tied_when_output_absent_untied_when_present(tmp_path):
    tied = random_model(get_config("tiny-llama").replace(tie_embeddings=True))
    assert load(write_gguf(tied, tmp_path / "t.gguf", "llama")).lm_head is None
    untied = random_model(get_config("tiny-llama"))
    assert load(write_gguf(untied, tmp_path / "u.gguf", "llama")).lm_head is not None


def test_gguf_shape_disagreeing_with_metadata(tmp_path):
    cfg = get_config("tiny-llama")
    model = random_model(cfg)
    path = write_gguf(model, tmp_path / "l.gguf", "llama")
    # same file, but claim a different FFN width in the metadata: names the tensor that disagrees
    bad = random_model(cfg.replace(ffn_dim=128))
    path2 = write_gguf(bad, tmp_path / "b.gguf", "llama")
    data = bytearray(path2.read_bytes())
    import struct

    key = b"llama.feed_forward_length"
    i = data.index(key) + len(key) + 4  # after the key and its uint32 type tag
    data[i:i + 4] = struct.pack("<I", 192)
    (tmp_path / "c.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"c\.gguf: tensor 'blk\.0\.ffn_.*shape .*metadata implies"):
        load(tmp_path / "c.gguf")
    assert load(path) is not None
