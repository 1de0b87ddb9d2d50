"""GPU checks of the MXFP4 expert GEMV at gpt-oss-120b shapes (gate_up N=5760, down N=2880, K=2880, 4 pairs): every
decode of the word-wise kernel (the pure-Triton one and both inline-PTX ones) and a spread of tiles against
dequantize_mxfp4 + a float64 matmul, and against the legacy byte-wise kernel. tests/test_mxfp4_gemv.py runs the
pure-Triton kernel under the interpreter on a CPU."""

from __future__ import annotations

import pytest
import torch

from conftest import cuda


def _packed(E, N, K, g):
    blocks = torch.randint(0, 256, (E, N, K // 2), device="cuda", generator=g, dtype=torch.int32).to(torch.uint8)
    blocks.view(E, -1)[:, :256] = torch.arange(256, device="cuda", dtype=torch.uint8)  # every byte value
    scales = torch.randint(112, 128, (E, N, K // 32), device="cuda", generator=g, dtype=torch.int32).to(torch.uint8)
    scales[0, :8] = 1  # extreme exponents on a few rows: 2**-126 (results ~1e-37) and 2**73
    scales[1, :8] = 200
    return blocks, scales


def _reference(x, rows, ex, blocks, scales, bias):
    from giants.inference.mxfp4 import dequantize_mxfp4

    ref, mag = [], []
    for r, e in zip(rows.tolist(), ex.tolist()):
        w = dequantize_mxfp4(blocks[e], torch.full_like(scales[e], 127), torch.float64)
        w = w * torch.exp2(scales[e].double() - 127).repeat_interleave(32, -1)
        xs = x[r].double()
        b = bias[e].double() if bias is not None else 0.0
        ref.append(w @ xs + b)
        mag.append(w.abs() @ xs.abs() + (b.abs() if bias is not None else 0.0))
    return torch.stack(ref), torch.stack(mag)


@cuda
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("N", [5760, 2880])
def test_mxfp4_gemv_decodes_and_tiles_at_gpt_oss_120b_shapes(N, bias):
    from giants.inference.kernels import mxfp4 as kmx

    E, K = 8, 2880
    g = torch.Generator(device="cuda").manual_seed(N + bias)
    blocks, scales = _packed(E, N, K, g)
    b = torch.randn(E, N, device="cuda", generator=g).to(torch.bfloat16) if bias else None
    x = torch.randn(3, K, device="cuda", generator=g)
    rows = torch.tensor([0, 2, 1, 0], device="cuda")
    ex = torch.tensor([0, 1, E - 1, 3], device="cuda")
    for xdt in (torch.bfloat16, torch.float32):
        xx = x.to(xdt)
        ref, mag = _reference(xx, rows, ex, blocks, scales, b)
        tol = 4e-6 * mag + 2.0 ** -120  # fp32 sums; below ~1e-36 fp32 subnormals round (documented in kernels/mxfp4.py)
        legacy = kmx.mxfp4_gemv(xx, rows, ex, blocks, scales, b, out=torch.empty(4, N, device="cuda"),
                                impl="legacy")
        assert bool(((legacy.double() - ref).abs() <= tol).all())
        pf = next(c for c in kmx.MXFP4_GEMV_CONFIGS if c["prefetch"])
        wide = next(c for c in kmx.MXFP4_GEMV_CONFIGS if c["block_k"] >= 1024)
        # hfma: x in fp16 (fp32 x rounds), each product and the 4-term lane sums rounded to fp16: 5 roundings of
        # 2**-11 at most a word, so |err| <= 2.5e-3 sum |w x| (the measured worst is far below)
        tol16 = 3e-3 * mag + 2.0 ** -120
        for decode in kmx.MXFP4_DECODES:
            for c in (kmx.MXFP4_GEMV_CONFIGS[0], pf, wide):
                y = kmx.mxfp4_gemv(xx, rows, ex, blocks, scales, b, out=torch.empty(4, N, device="cuda"),
                                   decode=decode, **c)
                err = (y.double() - ref).abs()
                t = tol16 if decode == "hfma" else tol
                assert bool((err <= t).all()), (xdt, decode, c, float((err / t).max()))
        y = kmx.mxfp4_gemv(xx, rows, ex, blocks, scales, b)  # default: bits, output in x's dtype
        assert y.dtype == xdt
        t = (tol16 if xdt == torch.bfloat16 else tol) + 2.0 ** -8 * ref.abs()  # bf16 x: hfma by default
        assert bool(((y.double() - ref).abs() <= t).all())


@cuda
@pytest.mark.parametrize("activation", ["clamped_swiglu", "silu_glu"])
def test_mxfp4_glu_epilogue_at_gpt_oss_120b_shape(activation):
    """The gate|up GEMV with the gated activation in its epilogue (gpt-oss-120b: F 2880, K 2880, 4 pairs, bias)
    equals the plain GEMV then the GLU kernel: exactly in fp32 (the same per-row sums), within a bf16 ulp in bf16,
    for every decode and for the default tile."""
    from giants.inference import kernels as tk
    from giants.inference.kernels import mxfp4 as kmx

    E, F, K = 8, 2880, 2880
    g = torch.Generator(device="cuda").manual_seed(7)
    blocks, scales = _packed(E, 2 * F, K, g)
    b = torch.randn(E, 2 * F, device="cuda", generator=g).to(torch.bfloat16)
    x = torch.randn(1, K, device="cuda", generator=g)
    rows, ex = torch.zeros(4, dtype=torch.long, device="cuda"), torch.tensor([0, 5, 2, 7], device="cuda")
    for xdt in (torch.float32, torch.bfloat16):
        xx = x.to(xdt)
        for decode in (*kmx.MXFP4_DECODES, None):
            c = dict(kmx.MXFP4_GEMV_CONFIGS[10], decode=decode) if decode else {}
            want = tk.glu(kmx.mxfp4_gemv(xx, rows, ex, blocks, scales, b, **c), activation, 1.702, 7.0)
            got = kmx.mxfp4_gemv(xx, rows, ex, blocks, scales, b, glu=activation, alpha=1.702, limit=7.0, **c)
            assert got.shape == (4, F) and got.dtype == xdt
            if xdt == torch.float32:
                assert torch.equal(got, want), (decode, float((got - want).abs().max()))
            else:
                torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-5)


def _from_lanes(lanes):
    from giants.inference.kernels import mxfp4 as kmx

    M, K = lanes.words.shape[0], lanes.k
    f = lanes.words.view(torch.float16).view(M, 4, K // 8, 2).float()
    out = torch.empty(M, K // 8, 8, device=f.device)
    for q, (a, b) in enumerate(kmx._LANE_SRC):
        out[:, :, a], out[:, :, b] = f[:, q, :, 0], f[:, q, :, 1]
    return out.view(M, K)


@cuda
def test_mxfp4_f16_lanes_path_at_gpt_oss_120b_shape():
    """The bf16 decode path on sm_89+: x put in fp16 lanes, the GLU GEMV (hfma) handing its output on in lanes, the
    down GEMV reading them. The lanes hold the plain GLU output exactly (bf16 values are fp16 values here); the down
    projection from lanes equals the one from the bf16 tensor; the whole of MXFP4MoE.expert_rows is within the hfma
    tolerance of a float64 reference; every tile and decode reads lanes given as x."""
    import giants
    from giants.inference.kernels import mxfp4 as kmx
    from giants.inference.mxfp4 import MXFP4MoE
    from giants.model.mlp import gated_activation

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the hfma decode needs sm_89+")
    E, F, K = 8, 2880, 2880
    g = torch.Generator(device="cuda").manual_seed(11)
    blocks, scales = _packed(E, 2 * F, K, g)
    d_blocks, d_scales = _packed(E, K, F, g)
    b = torch.randn(E, 2 * F, device="cuda", generator=g).to(torch.bfloat16)
    x = torch.randn(1, K, device="cuda", generator=g).to(torch.bfloat16)
    rows, ex, pair = torch.zeros(4, dtype=torch.long, device="cuda"), torch.tensor([0, 5, 2, 7], device="cuda"), \
        torch.arange(4, device="cuda")
    assert kmx.uses_lanes(x) and not kmx.uses_lanes(x.float())
    a = kmx.mxfp4_gemv(x, rows, ex, blocks, scales, b, glu="clamped_swiglu", lanes_out=True)
    plain = kmx.mxfp4_gemv(x, rows, ex, blocks, scales, b, glu="clamped_swiglu")
    assert isinstance(a, kmx.F16Lanes) and a.dtype == torch.bfloat16 and a.k == F
    assert torch.equal(_from_lanes(a), plain.float().half().float())
    y = kmx.mxfp4_gemv(a, pair, ex, d_blocks, d_scales, None)
    assert y.dtype == torch.bfloat16 and torch.equal(y, kmx.mxfp4_gemv(plain, pair, ex, d_blocks, d_scales, None))
    ref, mag = _reference(plain.float(), pair, ex, d_blocks, d_scales, None)
    t = 3e-3 * mag + 2.0 ** -120 + 2.0 ** -8 * ref.abs()
    for decode in kmx.MXFP4_DECODES:
        got = kmx.mxfp4_gemv(a, pair, ex, d_blocks, d_scales, None, decode=decode, **kmx.MXFP4_GEMV_CONFIGS[0])
        assert bool(((got.double() - ref).abs() <= t).all()), decode
    for c in kmx.MXFP4_GEMV_CONFIGS:
        if c["prefetch"] in (2, 3):  # x lanes prefetched too (and words two tiles ahead)
            got = kmx.mxfp4_gemv(a, pair, ex, d_blocks, d_scales, None, decode="hfma", **c)
            assert bool(((got.double() - ref).abs() <= t).all()), c
    cfg = giants.get_config("gpt-oss-120b")
    moe = MXFP4MoE(cfg, device="cuda").to(torch.bfloat16)
    moe.randomize(torch.Generator(device="cuda").manual_seed(2))
    h = torch.randn(2, cfg.d_model, device="cuda").to(torch.bfloat16)
    r, e = torch.tensor([0, 0, 1, 1], device="cuda"), torch.tensor([3, 9, 3, 100], device="cuda")
    got = moe.expert_rows(h, r, e, pair).double()
    want = []
    for i in range(4):
        w_gu, w_d = (w.double() for w in moe.expert_weights(int(e[i]), torch.float32))
        gu = w_gu @ h[int(r[i])].double() + moe.b_gate_up[int(e[i])].double()
        act = gated_activation(gu[None, :cfg.ffn_dim], gu[None, cfg.ffn_dim:], cfg)[0]
        want.append(w_d @ act + moe.b_down[int(e[i])].double())
    want = torch.stack(want)
    assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max()), float((got - want).abs().max())


@cuda
def test_runner_mxfp4_bf16_lanes_from_norm_route():
    """bf16 on sm_89+: the runner's norm_route hands the MXFP4 experts h in f16 lanes; the expert rows equal those of
    h given as a tensor (which mxfp4_gemv puts in lanes itself), bit for bit, and the batch-1 CUDA-graph decode runs."""
    import giants
    from giants.inference.cuda_runner import ExpertRows
    from giants.inference.engine import Engine
    from giants.inference.kernels import mxfp4 as kmx
    from giants.inference.mxfp4 import pack_experts

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the hfma decode needs sm_89+")
    model = pack_experts(giants.build(giants.get_config("tiny-gpt-oss"), seed=0)).to("cuda", torch.bfloat16).eval()
    for layer in model.layers:
        layer.mlp.randomize(torch.Generator(device="cuda").manual_seed(1))
    engine = Engine(model, block_size=16, num_blocks=64, max_model_len=128, max_num_seqs=2)
    runner, layer, cfg = engine.runner, model.layers[0], model.config
    a, r = (torch.randn(1, cfg.d_model, device="cuda").to(torch.bfloat16) for _ in range(2))
    norm, mlp = layer.mlp_norm, layer.mlp
    outs = []
    with torch.inference_mode():
        for lanes in (True, False):
            h, _, w, i = tk_norm_route(norm, mlp, cfg, a, r, runner.route_counter, lanes)
            assert isinstance(h, kmx.F16Lanes) == lanes
            out = runner._moe(0, mlp, h, route=(w, i))
            assert isinstance(out, ExpertRows)
            outs.append(out.y)
    assert torch.equal(outs[0], outs[1])
    from test_cuda_kernels import _run_one

    assert len(_run_one(engine, [5, 6, 7, 8])) > 0


def tk_norm_route(norm, mlp, cfg, a, r, counter, lanes):
    from giants.inference import kernels as tk

    return tk.norm_route(a, r, norm.weight, norm.eps, norm.kind == "rmsnorm_plus_one", mlp.router.weight,
                         mlp.router.bias, cfg.experts_per_token, cfg.router_softmax_before_topk,
                         cfg.router_renormalize, counter, lanes=lanes)


@cuda
def test_runner_mxfp4_expert_rows_path_changes_no_token():
    """The CUDA runner's small-batch MXFP4 MoE (the GLU GEMV and the down GEMV on the static pair tables, the combine
    in the next norm kernel) equals MXFP4MoE._forward_packed on the same rows, and gives the same greedy tokens as
    the packed layer's own path (fp32, CUDA graphs, batch 1 and 4)."""
    import giants
    from giants.inference.cuda_runner import ExpertRows
    from giants.inference.engine import Engine
    from giants.inference.mxfp4 import pack_experts

    model = pack_experts(giants.build(giants.get_config("tiny-gpt-oss"), seed=0)).to("cuda", torch.float32).eval()
    for layer in model.layers:
        layer.mlp.randomize(torch.Generator(device="cuda").manual_seed(1))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 49152, (int(n),), generator=gen).tolist() for n in (4, 21, 9, 50)]
    outs = []
    for fuse in (False, True):
        engine = Engine(model, block_size=16, num_blocks=128, max_model_len=256, max_num_seqs=4)
        runner = engine.runner
        runner.fuse_packed = fuse
        if fuse:
            mlp = model.layers[0].mlp
            h = torch.randn(3, model.config.d_model, device="cuda")
            with torch.inference_mode():
                _, weights, idx = mlp.route(h)
                out = runner._moe(0, mlp, h, route=(weights, idx))
                assert isinstance(out, ExpertRows)
                got = (out.y.view(3, out.k, -1) * out.weights.view(3, out.k, 1)).sum(1)
                torch.testing.assert_close(got, mlp._forward_packed(h, weights, idx), rtol=1e-5, atol=1e-5)
        from test_cuda_kernels import _run_all, _run_one

        one = [_run_one(engine, p) for p in prompts[:2]]
        outs.append((one, _run_all(engine, prompts, 12)))
    assert outs[0] == outs[1]
