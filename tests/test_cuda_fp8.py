"""FP8 weights on a CUDA GPU (run on the lent GPU: `pytest tests/test_cuda_fp8.py`): the Triton GEMV (decode), its
expert-indexed form, the weight-only Triton GEMM and the torch._scaled_mm path (prefill, row-wise scales) against
dequantize-then-matmul references, FP8Weight.linear's choice of path for every batch size, and the engine's fused
CUDA-graph decode of FP8 models against its generic path. The CPU suite (tests/test_fp8.py) checks the same kernels
under the Triton interpreter and the model quality."""

from __future__ import annotations

import pytest
import torch

from conftest import cuda

TOL = 2e-2  # ||out - ref|| / ||ref||


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _weight(N: int, K: int, layout: str, E: int = 0, seed: int = 0):
    from giants.inference.fp8 import FP8Weight, quantize

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(*((E,) if E else ()), N, K, device="cuda", generator=g) * 0.02
    if layout == "fused":  # per-row (1, 128) scales: Q|K|V of block-scaled parts that end off a block boundary
        a = N // 3 - 8
        out = FP8Weight.cat([FP8Weight(*quantize(part, (128, 128)), (128, 128)) for part in (w[:a], w[a:])])
        assert out.block == (1, 128)
        return out
    block = None if layout == "channel" else (128, 128)
    return FP8Weight(*quantize(w, block), block)


SHAPES = [(4096, 4096), (6144, 4096), (4096, 14336), (1024, 4096), (576, 576), (200, 328)]


@cuda
@pytest.mark.parametrize("layout", ["channel", "block", "fused"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_gemv_equals_dequantized_matmul(shape, layout):
    from giants.inference.kernels import fp8 as k8

    N, K = shape
    w = _weight(N, K, layout)
    deq = w.dequantize(torch.float32)
    b = torch.randn(N, device="cuda").to(torch.bfloat16)
    for M in (1, 2, 8):
        x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        ref = x.float() @ deq.t() + b.float()
        for c in k8.FP8_GEMV_CONFIGS:
            y = k8.fp8_gemv(x, w, b, config=c)
            assert y.dtype == torch.bfloat16 and y.shape == (M, N)
            assert _rel(y, ref) < TOL, (M, c)
        assert _rel(k8.fp8_gemv(x, w, None), ref - b.float()) < TOL  # the timed pick
    x = torch.randn(3, K, device="cuda")  # fp32 activations
    assert _rel(k8.fp8_gemv(x, w, None), x @ deq.t()) < 1e-4


@cuda
@pytest.mark.parametrize("layout", ["channel", "block"])
@pytest.mark.parametrize("glu", [None, "silu_glu", "clamped_swiglu"])
def test_fp8_norm_gemv_equals_norm_then_matmul(glu, layout):
    """The decode's fused kernel: residual add + RMSNorm + FP8 GEMV (+ the GLU of [gate; up])."""
    import giants
    from giants.inference.kernels import fp8 as k8
    from giants.model.mlp import gated_activation

    K, N2 = 4096, 28672 if glu else 6144
    w = _weight(N2, K, layout)
    deq = w.dequantize(torch.float32)
    for M in (1, 4):
        x, r = (torch.randn(M, K, device="cuda").to(torch.bfloat16) for _ in range(2))
        nw = torch.rand(K, device="cuda").to(torch.bfloat16)
        y, res = k8.fp8_norm_gemv(x, r, nw, 1e-5, False, w, None, glu=glu)
        s = (x.float() + r.float()).to(torch.bfloat16)
        assert torch.equal(res, s)
        h = (s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + 1e-5) * nw.float()).to(torch.bfloat16)
        ref = h.float() @ deq.t()
        if glu:
            cfg = giants.get_config("tiny-gpt-oss" if glu == "clamped_swiglu" else "tiny-llama")
            ref = gated_activation(ref[:, :N2 // 2], ref[:, N2 // 2:], cfg)
        assert _rel(y, ref) < TOL, M


@cuda
@pytest.mark.parametrize("layout", ["channel", "block"])
@pytest.mark.parametrize("shape", [(8, 5760, 2880), (32, 2880, 2880), (8, 448, 64)])
def test_fp8_expert_gemv_equals_per_pair_matmul(shape, layout):
    from giants.inference.kernels import fp8 as k8

    E, N, K = shape
    w = _weight(N, K, layout, E=E)
    deq = w.dequantize(torch.float32)
    b = torch.randn(E, N, device="cuda").to(torch.bfloat16)
    x = torch.randn(3, K, device="cuda").to(torch.bfloat16)
    rows = torch.tensor([0, 0, 1, 2, 2, 1], device="cuda")
    experts = torch.tensor([E - 1, 1, 0, 3 % E, E - 1, 2], device="cuda")
    ref = torch.stack([deq[e] @ x[r].float() + b[e].float() for r, e in zip(rows.tolist(), experts.tolist())])
    assert _rel(k8.fp8_expert_gemv(x, rows, experts, w, b), ref) < TOL


@cuda
@pytest.mark.parametrize("layout", ["channel", "block", "fused"])
@pytest.mark.parametrize("M", [9, 33, 200, 600])
def test_fp8_gemm_equals_dequantized_matmul(M, layout):
    from giants.inference.kernels import fp8 as k8

    N, K = 6144, 4096
    w = _weight(N, K, layout)
    deq = w.dequantize(torch.float32)
    b = torch.randn(N, device="cuda")
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(M, K, device="cuda").to(dtype)
        y = k8.fp8_gemm(x, w, b.to(dtype))
        assert y.dtype == dtype
        assert _rel(y, x.float() @ deq.t() + b) < TOL, dtype


@cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="torch._scaled_mm with row-wise scales needs CUDA compute capability 9.0 (Hopper)")
@pytest.mark.parametrize("M", [65, 256, 2048])
def test_scaled_mm_path_equals_dequantized_matmul(M):
    """W8A8: activations quantized per token (scale_a (M, 1)), weights per channel (scale_b (1, N)). Against the
    matmul of the two dequantized operands (the same maths in fp32), and against the weight-only reference (the
    activation rounding: E4M3 keeps 3 mantissa bits, ~2.5% per element on Gaussian inputs)."""
    from giants.inference.fp8 import quantize_rows_fp8

    N, K = 4096, 4096
    w = _weight(N, K, "channel")
    deq = w.dequantize(torch.float32)
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    b = torch.randn(N, device="cuda").to(torch.bfloat16)
    y = w.linear(x, b, path="scaled_mm")
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    xq, xs = quantize_rows_fp8(x)
    assert _rel(y, (xq.float() * xs) @ deq.t() + b.float()) < TOL
    assert _rel(y, x.float() @ deq.t() + b.float()) < 0.05


@cuda
@pytest.mark.parametrize("layout", ["channel", "block"])
def test_fp8_weight_linear_picks_a_path_for_every_batch(layout):
    from giants.inference import fp8

    N, K = 4096, 4096
    w = _weight(N, K, layout)
    deq = w.dequantize(torch.float32)
    for M in (1, fp8.GEMV_ROWS, fp8.GEMV_ROWS + 1, fp8.SCALED_MM_ROWS, fp8.SCALED_MM_ROWS + 1, 700):
        x = torch.randn(2, M, K, device="cuda").to(torch.bfloat16)  # leading dims kept
        y = torch.nn.functional.linear(x, w)
        assert y.shape == (2, M, N)
        w8a8 = layout == "channel" and M > fp8.SCALED_MM_ROWS and torch.cuda.get_device_capability() >= (9, 0)
        assert _rel(y, x.float() @ deq.t()) < (0.05 if w8a8 else TOL), M
    # a CUDA graph captures the decode GEMV
    x = torch.randn(1, K, device="cuda").to(torch.bfloat16)
    w.linear(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w.linear(x)
    x.copy_(torch.randn(1, K, device="cuda"))
    graph.replay()
    assert _rel(y, x.float() @ deq.t()) < TOL


def _greedy_agrees(a: list[list[int]], b: list[list[int]], first: int) -> bool:
    return all(x[:first] == y[:first] for x, y in zip(a, b))


def _fused_against_generic(name: str, q: str, experts=None) -> None:
    """The CUDA-graph decode against the generic path (the model's modules, one step at a time) on the same quantized
    weights, fp32 activations, batched and batch-1 steps: the same greedy tokens. experts: the MoE module type
    every layer must hold."""
    from giants.inference import LLM, SamplingParams
    from giants.inference.fp8 import FP8Weight

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 49152, (int(n),), generator=g).tolist() for n in (3, 17, 40, 5)]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = []
    for graphs in (True, False):
        llm = LLM(name, device="cuda", dtype="float32", seed=0, num_blocks=256, max_model_len=128, max_num_seqs=8,
                  use_cuda_graphs=graphs, quantization=q)
        assert isinstance(llm.engine.runner.fused[0][0][0], FP8Weight)
        assert experts is None or all(isinstance(layer.mlp, experts) for layer in llm.model.layers)
        assert getattr(llm.engine.runner, "fast", not graphs)  # the fused decode runs (graphs) / generic runner
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, sp)])
        outs.append([llm.generate([p], sp)[0].outputs[0].token_ids for p in prompts])  # batch-1 steps
    assert _greedy_agrees(outs[0], outs[2], 6) and _greedy_agrees(outs[1], outs[3], 6), outs


@cuda
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss"])
@pytest.mark.parametrize("q", ["fp8", "fp8-block+head"])
def test_fused_decode_of_fp8_models_equals_the_generic_path(name, q):
    """FP8 GEMVs in the fused forward, expert-indexed FP8 GEMVs for MoE, against the generic path."""
    _fused_against_generic(name, q)


@cuda
@pytest.mark.parametrize("name,q", [("tiny-mixtral", "fp8+mxfp4"), ("tiny-gpt-oss", "fp8-block+head+mxfp4")])
def test_fused_decode_of_fp8_linears_with_mxfp4_experts_equals_the_generic_path(name, q):
    """'+mxfp4' (FP8 linears, packed MXFP4 experts: Mixtral-8x22B on one 80 GB card) against the generic path."""
    from giants.inference.mxfp4 import MXFP4MoE

    _fused_against_generic(name, q, MXFP4MoE)


@cuda
def test_fp8_bf16_logits_close_to_the_bf16_model():
    """Llama-shaped twin in bf16: the FP8 model's logits stay within FP8's rounding of the bf16 model's (6.9% relative
    on the CPU in fp32, E4M3's ~2.6% per weight carried through two layers). Greedy tokens are no measure here: a
    random model's top logits are nearly tied, so any rounding may flip them (the fused-vs-generic test above checks
    the graph decode on the same FP8 weights token for token)."""
    import giants
    from giants.inference import LLM

    cfg = giants.get_config("tiny-llama").replace(d_model=512, ffn_dim=1536, n_heads=8, n_kv_heads=2, head_dim=64)
    ids = torch.tensor([[5, 17, 99, 2000, 31, 7, 7, 7, 8, 300, 1200, 44]], device="cuda")
    ref = LLM(giants.build(cfg, seed=0), device="cuda", dtype="bfloat16", num_blocks=64, max_model_len=64)
    fp8 = LLM(giants.build(cfg, seed=0), device="cuda", dtype="bfloat16", num_blocks=64, max_model_len=64,
              quantization="fp8")
    with torch.no_grad():
        a, b = ref.model(ids).float(), fp8.model(ids).float()
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.12, rel  # a missing or misplaced scale gives ~1 or more


@cuda
@pytest.mark.parametrize("layout", ["channel", "block", "fused"])
def test_chained_fp8_gemvs_equal_dequantized_norm_then_linear(layout):
    """The batch-1 chain on FP8 weights (Llama-3.1-8B shapes): the O GEMV adds the residual and hands on x * (next norm
    weight) and rstd; gate|up scales by rstd and applies the GLU; the QKV GEMV scales, rotates and writes the KV
    cache; each against the same kernel on the dequantized weight and against dequantize-then-matmul. Two tiles a
    layout (every tile compiles three kernels: the suite's time)."""
    import torch.nn.functional as F

    from giants.inference import kernels as tk
    from giants.inference.kernels import fp8 as k8

    torch.manual_seed(0)
    K, F_, dt = 4096, 14336, torch.float32
    wo, wgu = _weight(K, K, layout, seed=1), _weight(2 * F_, K, layout, seed=2)
    x, r = torch.randn(1, K, device="cuda", dtype=dt), torch.randn(1, K, device="cuda", dtype=dt)
    nw = torch.rand(K, device="cuda", dtype=dt) + 0.5
    for c in (k8.FP8_GEMV_CONFIGS[0], k8.FP8_GEMV_CONFIGS[7]):  # 8 x 1024 and 2 x 2048
        s, hx, rstd = tk.gemv(x, wo, None, residual=(r, nw, 1e-5, False), **c)
        assert _rel(s, x @ wo.dequantize().t() + r) < 1e-5, c
        torch.testing.assert_close(hx, s * nw)
        torch.testing.assert_close(rstd.rstd(), torch.rsqrt(s.pow(2).mean() + 1e-5).reshape(1), rtol=1e-5, atol=0)
        y = tk.gemv(hx, wgu, None, scale=rstd, glu="silu_glu", **c)
        want = tk.glu(F.linear(tk.rmsnorm(s, nw, 1e-5, False), wgu.dequantize()), "silu_glu")
        assert _rel(y, want) < 1e-5, c
    H, Hkv, D = 32, 8, 128
    wqkv = _weight((H + 2 * Hkv) * D, K, layout, seed=3)
    ang = torch.rand(1, D // 2, device="cuda") * 6
    slots = torch.tensor([37], device="cuda")
    caches = [torch.zeros(4, 16, Hkv, D, device="cuda", dtype=dt) for _ in range(4)]
    q1, q2 = torch.empty(1, H, D, device="cuda", dtype=dt), torch.empty(1, H, D, device="cuda", dtype=dt)
    tk.qkv_rope_gemv(hx, wqkv, None, rstd, ang.cos(), ang.sin(), q1, caches[0], caches[1], slots, H, Hkv, block_n=8,
                     block_k=1024)
    tk.qkv_rope_gemv(hx, wqkv.dequantize(), None, rstd, ang.cos(), ang.sin(), q2, caches[2], caches[3], slots, H, Hkv,
                     block_n=8, block_k=1024)
    for a, b in ((q1, q2), (caches[0], caches[2]), (caches[1], caches[3])):
        assert _rel(a, b) < 1e-5
    assert caches[0].view(-1, Hkv, D)[37].abs().sum() > 0


@cuda
@pytest.mark.parametrize("q", ["fp8", "fp8-block+head"])
def test_chained_fp8_decode_gives_the_plain_paths_tokens(q):
    """Batch-1 FP8 decode as the chain of FP8 GEMVs (no norm, rotary or GLU kernels) against the plain fused path
    (fp8_norm_gemv, rope_kv_write) on the same weights, fp32 activations: the same greedy tokens; left to timing, the
    runner records both graphs' times and whether they agree."""
    from giants.inference import LLM, SamplingParams

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 49152, (int(n),), generator=g).tolist() for n in (5, 33)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = []
    for chain in (False, True, None):
        llm = LLM("tiny-llama", device="cuda", dtype="float32", seed=0, num_blocks=128, max_model_len=256,
                  max_num_seqs=4, quantization=q)
        runner = llm.engine.runner
        assert runner.chain_possible and all(runner.chain_layers)
        runner.chain = chain
        outs.append([llm.generate([p], sp)[0].outputs[0].token_ids for p in prompts])  # batch 1: the chain applies
        if chain is None:
            t = runner.gemv_times["chain"]
            assert t["agrees"] and runner.chain == (t["chain_ms"] < 1.005 * t["plain_ms"])
        if chain:
            assert any(k[0] == "chain-qkv" for k in runner.gemv_choice)
    assert outs[1] == outs[0] and outs[2] == outs[0], outs
