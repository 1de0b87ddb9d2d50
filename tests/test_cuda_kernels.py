"""GPU-only checks of the decode kernels (run on the lent GPU: `pytest tests/test_cuda_kernels.py`).

CI has no GPU, so these skip there; the CPU suite covers the same engine through the generic path.
"""

from __future__ import annotations

import pytest
import torch

from conftest import cuda


@cuda
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(8, 5760, 2880), (32, 2880, 2880), (8, 448, 64)])
def test_expert_gemv_equals_per_pair_matmul(shape, bias):
    from giants.inference import kernels as tk

    E, N, K = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(E, N, K, device="cuda", generator=g).to(torch.bfloat16)
    b = torch.randn(E, N, device="cuda", generator=g).to(torch.bfloat16) if bias else None
    x = torch.randn(3, K, device="cuda", generator=g).to(torch.bfloat16)
    rows = torch.tensor([0, 0, 1, 2, 2, 1], device="cuda")
    experts = torch.tensor([E - 1, 1, 0, 3 % E, E - 1, 2], device="cuda")
    ref = torch.stack([w[e].float() @ x[r].float() + (b[e].float() if bias else 0)
                       for r, e in zip(rows.tolist(), experts.tolist())])
    for c in tk.EXPERT_GEMV_CONFIGS:
        y = tk.expert_gemv(x, rows, experts, w, b, **c).float()
        torch.testing.assert_close(y, ref, atol=0.05 * ref.abs().max().item() / 10, rtol=2e-2)


@cuda
@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-gpt-oss"])
def test_moe_decode_gemv_path_equals_grouped_path(name):
    """The fused runner's MoE at small batch (expert GEMV) against its grouped-GEMM path, fp32 accumulate."""
    from giants.inference import LLM, SamplingParams

    llm = LLM(name, device="cuda", dtype="bfloat16", seed=0, num_blocks=256, max_model_len=128, max_num_seqs=8)
    runner = llm.engine.runner
    layer = next(i for i, f in enumerate(runner.fused) if f[1][0] == "moe")
    mlp = llm.model.layers[layer].mlp
    h = torch.randn(4, llm.model.config.d_model, device="cuda", dtype=torch.bfloat16)
    from giants.inference.cuda_runner import ExpertRows

    def combined(out):
        if isinstance(out, ExpertRows):
            return (out.y.float().view(h.shape[0], out.k, -1) * out.weights.float().view(h.shape[0], out.k, 1)).sum(1)
        return out.float()

    with torch.inference_mode():
        fast = combined(runner._moe(layer, mlp, h))
        for mode in ("split", "glu", "fused"):  # every expert plan, whichever the tuner picked
            key = next(k for k in runner.gemv_choice if k[0] == "experts")
            plan = runner.gemv_choice[key]
            runner.gemv_choice[key] = (mode, *plan[1:])
            torch.testing.assert_close(combined(runner._moe(layer, mlp, h)), fast, atol=3e-2, rtol=3e-2)
            runner.gemv_choice[key] = plan
        runner.moe_gemv_pairs = 0
        grouped = runner._moe(layer, mlp, h).float()
        ref = mlp(h[None].float().to(torch.bfloat16))[0][0].float()
    torch.testing.assert_close(fast, grouped, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(fast, ref, atol=3e-2, rtol=3e-2)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    runner.moe_gemv_pairs = 32
    outs = llm.generate([[5, 6, 7], [9, 10, 11, 12]], sp)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)


@cuda
@pytest.mark.parametrize("before,renorm", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("E,K", [(8, 2), (32, 4), (128, 4)])
def test_route_topk_equals_moe_route(E, K, before, renorm):
    from giants.config import ModelConfig
    from giants.inference import kernels as tk
    from giants.model.mlp import MoE

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, ffn_dim=16,
                      n_experts=E, experts_per_token=K, router_softmax_before_topk=before,
                      router_renormalize=renorm)
    moe = MoE(cfg).cuda()
    torch.nn.init.normal_(moe.router.weight, std=1.0)
    x = torch.randn(5, 32, device="cuda")
    _, w_ref, i_ref = moe.route(x)
    w, i = tk.route_topk(moe.router(x), K, before, renorm, torch.float32)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-5)


@cuda
@pytest.mark.parametrize("activation", ["silu_glu", "gelu_tanh_glu", "clamped_swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_expert_down_combine_equals_reference(activation, bias):
    from giants.config import ModelConfig
    from giants.inference import kernels as tk
    from giants.model.mlp import gated_activation

    E, N, F, B, K = 8, 96, 200, 3, 2
    cfg = ModelConfig(vocab_size=64, d_model=N, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, ffn_dim=F,
                      n_experts=E, experts_per_token=K, activation=activation)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(E, N, F, device="cuda", generator=g).to(torch.bfloat16)
    b = torch.randn(E, N, device="cuda", generator=g).to(torch.bfloat16) if bias else None
    gu = (3 * torch.randn(B * K, 2 * F, device="cuda", generator=g)).to(torch.bfloat16)
    expert = torch.tensor([1, 7, 0, 1, 5, 3], device="cuda")
    weights = torch.softmax(torch.randn(B, K, device="cuda", generator=g), -1).to(torch.bfloat16).view(-1)
    a = gated_activation(gu[:, :F].float(), gu[:, F:].float(), cfg).to(torch.bfloat16).float()
    ref = torch.zeros(B, N, device="cuda")
    for p in range(B * K):
        e = int(expert[p])
        y = w[e].float() @ a[p] + (b[e].float() if bias else 0)
        ref[p // K] += weights[p].float() * y.to(torch.bfloat16).float()
    for c in tk.EXPERT_GEMV_CONFIGS:
        out = tk.expert_down_combine(gu, expert, weights, w, b, K, activation, cfg.swiglu_alpha, cfg.swiglu_limit,
                                     **c).float()
        torch.testing.assert_close(out, ref, atol=0.02 * ref.abs().max().item(), rtol=2e-2)


@cuda
@pytest.mark.parametrize("activation", ["silu_glu", "clamped_swiglu"])
def test_expert_gemv_with_activation_and_norm_combine(activation):
    """The split down path: activation applied on load, then the combine fused into residual + RMSNorm."""
    from giants.config import ModelConfig
    from giants.inference import kernels as tk
    from giants.model.mlp import gated_activation

    E, N, F, B, K = 8, 96, 200, 3, 2
    cfg = ModelConfig(vocab_size=64, d_model=N, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, ffn_dim=F,
                      n_experts=E, experts_per_token=K, activation=activation)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(E, N, F, device="cuda", generator=g).to(torch.bfloat16)
    gu = (3 * torch.randn(B * K, 2 * F, device="cuda", generator=g)).to(torch.bfloat16)
    expert = torch.tensor([1, 7, 0, 1, 5, 3], device="cuda")
    pairs = torch.arange(B * K, device="cuda")
    a = gated_activation(gu[:, :F].float(), gu[:, F:].float(), cfg).to(torch.bfloat16).float()
    ref = torch.stack([w[int(e)].float() @ a[p] for p, e in enumerate(expert.tolist())])
    y = tk.expert_gemv(gu, pairs, expert, w, None, activation=activation, alpha=cfg.swiglu_alpha,
                       limit=cfg.swiglu_limit)
    torch.testing.assert_close(y.float(), ref, atol=0.02 * ref.abs().max().item(), rtol=2e-2)
    weights = torch.softmax(torch.randn(B, K, device="cuda", generator=g), -1).to(torch.bfloat16).view(-1)
    residual = torch.randn(B, N, device="cuda", generator=g).to(torch.bfloat16)
    norm_w = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
    out, res = tk.rmsnorm(y, norm_w, 1e-5, False, residual=residual, combine=(weights, K))
    x = ((y.float().view(B, K, N) * weights.float().view(B, K, 1)).sum(1).to(torch.bfloat16).float()
         + residual.float()).to(torch.bfloat16)
    torch.testing.assert_close(res.float(), x.float(), atol=2e-2, rtol=2e-2)
    xf = x.float()
    ref_out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w.float()
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=3e-2)


@cuda
@pytest.mark.parametrize("activation", [None, "silu_glu", "clamped_swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_splitk_gemv_partials_sum_to_reference(activation, bias):
    """Split-K GEMV: the split partials (fp32) add up to the per-pair product, activation and bias included;
    split 1 gives the result in the input dtype. Dense weights (N, K) are one expert."""
    from giants.config import ModelConfig
    from giants.inference import kernels as tk
    from giants.model.mlp import gated_activation

    E, N, K = 5, 300, 1000
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(E, N, K, device="cuda", generator=g).to(torch.bfloat16)
    b = torch.randn(E, N, device="cuda", generator=g).to(torch.bfloat16) if bias else None
    width = 2 * K if activation else K
    x = torch.randn(3, width, device="cuda", generator=g).to(torch.bfloat16)
    rows = torch.tensor([0, 2, 1, 1], device="cuda")
    experts = torch.tensor([4, 0, 2, 4], device="cuda")
    if activation:
        cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, ffn_dim=K,
                          activation=activation)
        xin = gated_activation(x[:, :K].float(), x[:, K:].float(), cfg).to(torch.bfloat16).float()
    else:
        xin = x.float()
    ref = torch.stack([w[e].float() @ xin[r] + (b[e].float() if bias else 0)
                       for r, e in zip(rows.tolist(), experts.tolist())])
    for c in tk.SPLITK_CONFIGS:
        y = tk.splitk_gemv(x, rows, experts, w, b, activation=activation, **c)
        assert y.dtype == (torch.float32 if c["split"] > 1 else torch.bfloat16)
        got = y.float().view(4, c["split"], N).sum(1)
        torch.testing.assert_close(got, ref, atol=0.02 * ref.abs().max().item(), rtol=2e-2)
    dense = tk.splitk_gemv(x[:1], rows[:1] * 0, rows[:1] * 0, w[0], b[0] if bias else None, activation=activation)
    torch.testing.assert_close(dense.float()[0], (w[0].float() @ xin[0] + (b[0].float() if bias else 0)),
                               atol=0.02 * ref.abs().max().item(), rtol=2e-2)


@cuda
def test_dense_down_plans_agree():
    """The one-row dense MLP down projection: GLU kernel + linear against the activation-on-load GEMV."""
    from giants.inference import LLM

    llm = LLM("tiny-llama", device="cuda", dtype="bfloat16", seed=0, num_blocks=64, max_model_len=64, max_num_seqs=2)
    runner = llm.engine.runner
    mlp = llm.model.layers[0].mlp
    gu = torch.randn(1, 2 * llm.model.config.ffn_dim, device="cuda", dtype=torch.bfloat16)
    w, b = mlp.down_proj.weight, mlp.down_proj.bias
    with torch.inference_mode():
        first = runner._dense_down(gu, w, b).float()
        key = ("dense-down", tuple(w.shape), b is not None)
        chosen = runner.gemv_choice[key]
        runner.gemv_choice[key] = None
        unfused = runner._dense_down(gu, w, b).float()
        runner.gemv_choice[key] = {"split": 1, "block_n": 8, "block_k": 256, "num_warps": 4, "num_stages": 3}
        fused = runner._dense_down(gu, w, b).float()
        runner.gemv_choice[key] = chosen
    torch.testing.assert_close(fused, unfused, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(first, unfused, atol=2e-2, rtol=2e-2)


@cuda
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2"])
def test_async_decode_on_cuda_graphs_matches_sync(name):
    """On CUDA the engine launches each decode step (a graph replay fed by the device tokens) before reading
    the last step's tokens: same tokens as the synchronous engine, with a request stopping mid-batch."""
    import giants
    from giants.inference import SamplingParams
    from giants.inference.engine import Engine

    # fp32: the MoE twins' bf16 CUDA path sums experts with atomics, so two runs may differ on near-ties
    model = giants.build(giants.get_config(name), seed=0).to("cuda", torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 49152, (int(n),), generator=g).tolist() for n in (3, 17, 40, 5)]
    outs = []
    for async_decode in (False, True):
        engine = Engine(model, block_size=16, num_blocks=128, max_model_len=256, max_num_seqs=8,
                        async_decode=async_decode)
        assert engine.async_decode == async_decode and engine.runner.use_graphs
        done = {}
        for i, p in enumerate(prompts):
            stop = outs[0][1][5] if outs and i == 1 else None  # the sync run's 6th token of request 1
            engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                         stop_token_ids=[stop] if stop is not None else []))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[int(out.request_id)] = out.outputs[0].token_ids
        outs.append([done[i] for i in range(len(prompts))])
        if async_decode:
            assert engine.num_ahead_used > 10 and engine.num_ahead_dropped >= 1
    sync, asyn = outs
    s1 = sync[1][:sync[1].index(sync[1][5]) + 1]
    assert asyn[1] == s1 and [asyn[i] for i in (0, 2, 3)] == [sync[i] for i in (0, 2, 3)]


@cuda
def test_clip_folded_into_fused_adamw_equals_clip_then_step():
    """The trainer's CUDA path with master_weights=False: clipping as the fused AdamW's grad_scale equals
    clip_grad_norm_ then step."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (128, 64)]
    a = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    grads = [10 * torch.randn(s, device="cuda") for s in shapes]  # norm far above the clip
    opt_a = torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1, fused=True)
    opt_b = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(3):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = (g * (step + 1)).clone(), (g * (step + 1)).clone()
        torch.nn.utils.clip_grad_norm_(a, 1.0)
        opt_a.step()
        norm = torch.nn.utils.get_total_norm([q.grad for q in b], foreach=True)
        opt_b.grad_scale = torch.clamp((norm.float() + 1e-6) / 1.0, min=1.0)
        opt_b.step()
        opt_b.grad_scale = None
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)


@cuda
@pytest.mark.parametrize("glu", [None, "silu_glu", "gelu_tanh_glu"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("plus_one", [False, True])
def test_norm_gemv_equals_norm_then_linear(glu, residual, plus_one):
    """One kernel for residual add + RMSNorm + one-row GEMV (+ GLU) against the separate steps."""
    from giants.config import ModelConfig
    from giants.inference import kernels as tk
    from giants.model.mlp import gated_activation

    K, N = 1000, 300
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, K, device="cuda", generator=g).to(torch.bfloat16)
    r = torch.randn(1, K, device="cuda", generator=g).to(torch.bfloat16) if residual else None
    nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(torch.bfloat16)
    rows = 2 * N if glu else N
    w = (torch.randn(rows, K, device="cuda", generator=g) / 30).to(torch.bfloat16)
    b = torch.randn(rows, device="cuda", generator=g).to(torch.bfloat16)
    xs = (x.float() + r.float()).to(torch.bfloat16) if residual else x
    xf = xs.float()
    h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * (nw.float() + plus_one)).to(torch.bfloat16)
    ref = (h.float() @ w.float().t() + b.float()).to(torch.bfloat16).float()
    if glu:
        cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, ffn_dim=N,
                          activation=glu)
        ref = gated_activation(ref[:, :N], ref[:, N:], cfg)
    for c in tk.NORM_GEMV_CONFIGS:
        y, res = tk.norm_gemv(x, r, nw, 1e-5, plus_one, w, b, glu=glu, **c)
        torch.testing.assert_close(y.float(), ref, atol=0.02 * ref.abs().max().item(), rtol=2e-2)
        if residual:
            assert torch.equal(res, xs)
        else:
            assert res is None


@cuda
def test_runner_norm_gemv_plan_agrees():
    """The runner's fused norm + QKV and norm + gate|up + GLU against its separate kernels (tiny-llama, bf16)."""
    from giants.inference import LLM

    llm = LLM("tiny-llama", device="cuda", dtype="bfloat16", seed=0, num_blocks=64, max_model_len=64, max_num_seqs=2)
    runner = llm.engine.runner
    layer = llm.model.layers[1]
    (w_qkv, b_qkv), mlp_w = runner.fused[1]
    D = llm.model.config.d_model
    x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    cfg = {"block_n": 8, "block_k": 512, "num_warps": 4, "num_stages": 4}
    with torch.inference_mode():
        for mod, w, b, glu in ((layer.attn_norm, w_qkv, b_qkv, False), (layer.mlp_norm, mlp_w[1], mlp_w[2], True)):
            runner._norm_linear(mod, x, r, w, b, glu)  # tunes
            key = ("norm-gemv", tuple(w.shape), b is not None, glu, True)
            assert runner.gemv_times[key]["agrees"], runner.gemv_times[key]
            chosen = runner.gemv_choice[key]
            runner.gemv_choice[key] = None
            y0, res0, act0 = runner._norm_linear(mod, x, r, w, b, glu)
            if glu:
                y0 = tk_glu(y0, llm.model.config)
            runner.gemv_choice[key] = cfg
            y1, res1, act1 = runner._norm_linear(mod, x, r, w, b, glu)
            runner.gemv_choice[key] = chosen
            assert act1 == glu and not act0 and torch.equal(res0, res1)
            torch.testing.assert_close(y1.float(), y0.float(), atol=2e-2, rtol=2e-2)


def tk_glu(gu, cfg):
    from giants.inference import kernels as tk

    return tk.glu(gu, cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit)


@cuda
@pytest.mark.parametrize("master_weights", [None, False], ids=["master-adamw", "fused-adamw"])
def test_trainer_on_cuda_clips_through_the_optimizer(tmp_path, master_weights):
    """CUDA training steps of a tiny twin with clipping on, through the optimizer the trainer picks: by default
    (bf16, master weights) MasterAdamW over bf16 matmul weights; with master_weights=False (`--master-weights off`)
    torch's fused AdamW over fp32 weights. Either way the clip rides in the optimizer's kernel: every step() sees
    grad_scale = max(1, (norm + 1e-6) / clip) of that step's logged, pre-clip gradient norm, and the trainer clears
    grad_scale and found_inf after it; the loss is finite and falls. (That a grad_scale equals clipping first:
    test_clip_folded_into_fused_adamw_equals_clip_then_step, and MasterAdamW against fused AdamW with the same
    grad_scale: tests/test_cuda_optim.py.)"""
    import numpy as np

    from giants.train.data import prepare
    from giants.train.optim import MasterAdamW
    from giants.train.trainer import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    text = tmp_path / "t.txt"
    text.write_text(" ".join("abcdefgh"[int(i)] * 3 for i in rng.integers(0, 8, 6000)))
    prepare(text, "bytes", tmp_path / "ds", val_fraction=0.1)
    clip, steps = 0.5, 12
    tc = TrainConfig(out=str(tmp_path / "run"), preset="tiny-llama", data=str(tmp_path / "ds"), tokenizer="bytes",
                     seq_len=64, batch_size=4, steps=steps, lr=3e-3, warmup_steps=0, schedule="constant",
                     device="cuda", grad_clip=clip, master_weights=master_weights, eval_every=0,
                     checkpoint_at_end=False, save_final=False, progress=False, log_every=1)
    tr = Trainer(tc)
    opt = tr.optimizer
    dtypes = {p.dtype for p in tr.model.parameters()}
    assert tr.bf16  # precision "auto" on CUDA
    if master_weights is None:
        assert tr.master and isinstance(opt, MasterAdamW)
        assert dtypes == {torch.float32, torch.bfloat16}  # bf16 matmul weights; norms and embedding fp32
    else:
        assert not tr.master and type(opt) is torch.optim.AdamW and opt.defaults.get("fused")
        assert dtypes == {torch.float32}  # fp32 weights under bf16 autocast
    seen = []
    step = opt.step

    def spy(*args, **kwargs):  # what the optimizer's kernel reads: the scale set for this step
        seen.append(None if opt.grad_scale is None else opt.grad_scale.detach().clone())
        return step(*args, **kwargs)

    opt.step = spy
    tr.run()
    assert [h["step"] for h in tr.history] == list(range(1, steps + 1)) and len(seen) == steps
    losses = [h["train_loss"] for h in tr.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    for h, scale in zip(tr.history, seen):
        assert scale is not None, h  # folded into the optimizer, not a separate clip_grad_norm_ pass
        assert float(scale) == pytest.approx(max(1.0, (h["grad_norm"] + 1e-6) / clip), rel=1e-5), h
    assert opt.grad_scale is None and opt.found_inf is None
    assert any(h["grad_norm"] > clip for h in tr.history)  # clipping was active at some step


@cuda
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2", "tiny-gpt-oss"])
def test_programmatic_dependent_launch_changes_no_token(name):
    """Kernels launched with PDL start while the previous kernel drains and wait for its writes: the decode
    graphs give the same tokens with PDL off and on."""
    import giants
    from giants.inference import kernels as tk
    from giants.inference.engine import Engine

    model = giants.build(giants.get_config(name), seed=0).to("cuda", torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (int(n),), generator=g).tolist() for n in (3, 17, 40, 5, 70)]
    default, outs = tk.PDL_ON, []
    try:
        for on in (False, True):
            tk.set_pdl(on)
            engine = Engine(model, block_size=16, num_blocks=128, max_model_len=256, max_num_seqs=8)
            assert engine.runner.use_graphs
            outs.append(_run_all(engine, prompts, 20))
    finally:
        tk.set_pdl(default)
    assert outs[1] == outs[0]


@cuda
@pytest.mark.parametrize("glu", [None, "silu_glu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("plus_one", [False, True])
def test_chained_gemvs_equal_norm_then_linear(glu, bias, plus_one):
    """gemv(residual=) returns residual + linear, that times the next norm weight, and its ChainNorm (every
    program's sum of squares); gemv(scale=) with it equals rmsnorm then linear (then the GLU), every program of
    the consumer summing the 2048 parts itself (4096 rows, block_n 2)."""
    import torch.nn.functional as F

    from giants.inference import kernels as tk

    torch.manual_seed(0)
    K, N, dt = 4096, 1536, torch.float32
    x, r = torch.randn(1, 2048, device="cuda", dtype=dt), torch.randn(1, K, device="cuda", dtype=dt)
    w = torch.randn(K, 2048, device="cuda", dtype=dt) / 45
    b = torch.randn(K, device="cuda", dtype=dt) if bias else None
    nw = torch.rand(K, device="cuda", dtype=dt) + 0.5
    s, hx, rstd = tk.gemv(x, w, b, residual=(r, nw, 1e-5, plus_one), block_n=2, block_k=512)
    ref = F.linear(x, w, b) + r
    torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hx, s * (nw + 1 if plus_one else nw))
    assert rstd.parts.shape == (2048,) and rstd.n == K
    torch.testing.assert_close(rstd.rstd(), torch.rsqrt(s.pow(2).mean() + 1e-5).reshape(1), rtol=1e-5, atol=0)
    w2 = torch.randn(2 * N if glu else N, K, device="cuda", dtype=dt) / 64
    b2 = torch.randn(w2.shape[0], device="cuda", dtype=dt) if bias else None
    y = tk.gemv(hx, w2, b2, scale=rstd, glu=glu, block_n=8, block_k=512)
    h = tk.rmsnorm(s, nw, 1e-5, plus_one)
    want = F.linear(h, w2, b2)
    if glu:
        want = tk.glu(want, glu)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt-oss-described"])
def test_chained_dense_decode_gives_the_same_tokens(name):
    """Batch-1 dense layers as a chain of GEMVs (residual add, next norm's weight and rstd in the O / down
    epilogues, rstd and the GLU in the next GEMV's epilogue): same greedy tokens as the plain kernels; left to
    timing, the runner records both graphs' times and whether they agree."""
    import giants
    from giants.inference.engine import Engine

    model = giants.build(giants.get_config(name), seed=0).to("cuda", torch.float32).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 49152, (int(n),), generator=g).tolist() for n in (5, 33)]
    outs = []
    for chain in (False, True, None):
        engine = Engine(model, block_size=16, num_blocks=128, max_model_len=256, max_num_seqs=4)
        assert engine.runner.chain_possible
        engine.runner.chain = chain
        outs.append([_run_one(engine, p) for p in prompts])  # one at a time: batch 1, where the chain applies
        if chain is None:
            t = engine.runner.gemv_times["chain"]
            assert t["agrees"] and engine.runner.chain == (t["chain_ms"] < 1.005 * t["plain_ms"])
        if chain:
            cfg = model.config
            assert ("chain-glu", (2 * cfg.ffn_dim, cfg.d_model), cfg.mlp_bias) in engine.runner.gemv_choice
    assert outs[1] == outs[0] and outs[2] == outs[0]


def _run_all(engine, prompts, max_tokens: int) -> list[list[int]]:
    """Greedy tokens of all prompts submitted at once (batched decode), in prompt order."""
    from giants.inference import SamplingParams

    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
    return [done[i] for i in range(len(prompts))]


def _run_one(engine, prompt):
    from giants.inference import SamplingParams

    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                return out.outputs[0].token_ids


@cuda
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block_n", [2, 8, 16])
def test_qkv_rope_gemv_equals_gemv_then_rope_kv_write(rope, bias, block_n):
    """The QKV GEMV with the rotary and the paged KV write in its epilogue equals the GEMV then
    rope_kv_write (Llama-3.1-8B head layout: 32 query heads, 8 kv heads, head dim 128)."""
    from giants.inference import kernels as tk

    torch.manual_seed(0)
    H, Hkv, D, K, dt = 32, 8, 128, 4096, torch.float32
    x = torch.randn(1, K, device="cuda", dtype=dt)
    w = torch.randn((H + 2 * Hkv) * D, K, device="cuda", dtype=dt) / 64
    b = torch.randn(w.shape[0], device="cuda", dtype=dt) if bias else None
    scale = tk.ChainNorm(torch.tensor([4.0, 2.25], device="cuda"), 4, 1e-5)  # rstd ~0.8, as the chain hands it on
    ang = torch.rand(1, D // 2, device="cuda") * 6
    cos, sin = (ang.cos(), ang.sin()) if rope else (None, None)
    slots = torch.tensor([37], device="cuda")
    caches = [torch.zeros(4, 16, Hkv, D, device="cuda", dtype=dt) for _ in range(4)]
    q1, q2 = torch.empty(1, H, D, device="cuda", dtype=dt), torch.empty(1, H, D, device="cuda", dtype=dt)
    tk.qkv_rope_gemv(x, w, b, scale, cos, sin, q1, caches[0], caches[1], slots, H, Hkv, block_n=block_n)
    qkv = tk.gemv(x, w, b, scale=scale)
    tk.rope_kv_write(qkv, cos, sin, q2, caches[2], caches[3], slots, H, Hkv)
    torch.testing.assert_close(q1, q2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[0], caches[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1], caches[3], rtol=1e-4, atol=1e-4)
    assert caches[0].view(-1, Hkv, D)[37].abs().sum() > 0


@cuda
@pytest.mark.parametrize("before,renorm", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("E,K,B", [(8, 2, 3), (32, 4, 1), (128, 4, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_route_equals_norm_then_router_then_topk(E, K, B, before, renorm, bias):
    """norm_route (residual add, RMSNorm, router logits spread over programs, top-k by the last program
    to finish) equals rmsnorm, the router linear and route_topk; its ticket counter resets itself."""
    import torch.nn.functional as F

    from giants.inference import kernels as tk

    torch.manual_seed(0)
    D = 2880
    x, r = torch.randn(B, D, device="cuda"), torch.randn(B, D, device="cuda")
    nw = torch.rand(D, device="cuda") + 0.5
    rw = torch.randn(E, D, device="cuda") / 50
    rb = torch.randn(E, device="cuda") if bias else None
    cnt = torch.zeros(8, dtype=torch.int32, device="cuda")
    h2, res2 = tk.rmsnorm(x, nw, 1e-5, False, residual=r)
    w2, i2 = tk.route_topk(F.linear(h2, rw, rb), K, before, renorm, torch.float32)
    for ep in (1, 2, 4):
        for _ in range(2):
            h, res, w, i = tk.norm_route(x, r, nw, 1e-5, False, rw, rb, K, before, renorm, cnt, experts_per_program=ep)
            assert int(cnt.abs().sum()) == 0
        torch.testing.assert_close(h, h2)
        torch.testing.assert_close(res, res2)
        assert torch.equal(i, i2)
        torch.testing.assert_close(w, w2, rtol=1e-5, atol=1e-5)
    # lanes=True: h in the f16 lanes of mxfp4_lanes (for the MXFP4 experts), everything else unchanged
    from giants.inference.kernels import mxfp4 as kmx

    hl, res, w, i = tk.norm_route(x, r, nw, 1e-5, False, rw, rb, K, before, renorm, cnt, lanes=True)
    assert isinstance(hl, kmx.F16Lanes) and hl.k == D and hl.dtype == x.dtype
    assert torch.equal(hl.words, kmx.mxfp4_lanes(h).words)
    torch.testing.assert_close(res, res2)
    assert torch.equal(i, i2)


@cuda
@pytest.mark.parametrize("activation", ["silu_glu", "clamped_swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_expert_gemv_glu_epilogue_equals_gemv_then_glu(activation, bias):
    """expert_gemv(glu=) streams each routed expert's gate and up rows together and applies the activation in
    its epilogue: equal to the gate|up GEMV then the GLU kernel, every config (gpt-oss-20b expert shape)."""
    from giants.inference import kernels as tk

    torch.manual_seed(0)
    E, F_, D = 8, 2880, 2880
    w = (torch.randn(E, 2 * F_, D, device="cuda") / 50).to(torch.bfloat16)
    b = torch.randn(E, 2 * F_, device="cuda").to(torch.bfloat16) if bias else None
    x = torch.randn(2, D, device="cuda").to(torch.bfloat16)
    rows, experts = torch.tensor([0, 0, 1, 1], device="cuda"), torch.tensor([7, 2, 2, 0], device="cuda")
    for c in tk.EXPERT_GEMV_CONFIGS:
        ref = tk.glu(tk.expert_gemv(x, rows, experts, w, b, **c), activation).float()
        y = tk.expert_gemv(x, rows, experts, w, b, glu=activation, **c).float()
        torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


@cuda
@pytest.mark.parametrize("name", ["tiny-gpt-oss", "tiny-mixtral", "tiny-llama"])
def test_route_and_qkv_rope_fusions_change_no_token(name):
    """The MoE norm+router+top-k kernel and the one-row QKV+rotary+KV-write GEMV (outside the chain), and
    each expert plan: the same greedy tokens as the separate kernels (fp32, CUDA graphs, batch 1 and 4)."""
    import giants
    from giants.inference.engine import Engine

    model = giants.build(giants.get_config(name), seed=0).to("cuda", torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 49152, (int(n),), generator=g).tolist() for n in (4, 21, 9, 50)]
    outs = []
    for fuse, mode in ((False, None), (True, None), (True, "glu"), (True, "fused")):
        engine = Engine(model, block_size=16, num_blocks=128, max_model_len=256, max_num_seqs=4)
        runner = engine.runner
        runner.fuse_route = runner.fuse_qkv_rope = fuse
        runner.chain = False
        if mode is not None and model.config.is_moe:
            orig = runner._moe_plan
            runner._moe_plan = lambda *a, orig=orig, mode=mode: (mode, *orig(*a)[1:])
        one = [_run_one(engine, p) for p in prompts[:2]]  # batch 1
        outs.append((one, _run_all(engine, prompts, 12)))
    assert all(o == outs[0] for o in outs[1:])


@cuda
@pytest.mark.parametrize("splits,fused", [(1, False), (4, False), (4, True), (16, True)])
@pytest.mark.parametrize("variant", ["plain", "sinks+window", "softcap"])
def test_paged_attention_equals_softmax_reference(splits, fused, variant):
    """Paged decode attention over key splits, combined by the reduce kernel or by each (sequence, kv head)'s
    last split program, against softmax(q k^T) v over the gathered keys; twice, so the tickets reset."""
    from giants.inference import kernels as tk

    B, H, Hkv, D, bs, pages = 3, 32, 8, 128, 16, 24
    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(B * pages + 1, bs, Hkv, D, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn(B * pages + 1, bs, Hkv, D, device="cuda", generator=g).to(torch.bfloat16)
    table = torch.randperm(B * pages, device="cuda", generator=g).view(B, pages).to(torch.int32)
    lens = torch.tensor([1, 37, pages * bs], dtype=torch.int32, device="cuda")
    q = torch.randn(B, H, D, device="cuda", generator=g).to(torch.bfloat16)
    sinks = torch.randn(H, device="cuda", generator=g) if variant == "sinks+window" else None
    window = 64 if variant == "sinks+window" else 0
    softcap = 30.0 if variant == "softcap" else None
    attn = tk.PagedAttention(n_heads=H, n_kv_heads=Hkv, head_dim=D, block_size=bs, scale=D ** -0.5, window=window,
                             softcap=softcap, sinks=sinks)
    counter = torch.zeros(B * Hkv, dtype=torch.int32, device="cuda")
    for _ in range(2):
        out = torch.full((B, H, D), float("nan"), dtype=torch.bfloat16, device="cuda")
        attn(q, kc, vc, table, lens, out, num_splits=splits, counter=counter if fused else None)
        torch.cuda.synchronize()
        assert counter.eq(0).all()
        for b in range(B):
            L = int(lens[b])
            k = kc[table[b].long()].reshape(-1, Hkv, D)[:L].float().repeat_interleave(H // Hkv, 1)
            v = vc[table[b].long()].reshape(-1, Hkv, D)[:L].float().repeat_interleave(H // Hkv, 1)
            s = torch.einsum("hd,lhd->hl", q[b].float(), k) * D ** -0.5
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            if window:
                s[:, :max(0, L - window)] = float("-inf")
            if sinks is not None:
                s = torch.cat([s, sinks[:, None]], 1)
            a = torch.softmax(s, -1)[:, :L]
            torch.testing.assert_close(out[b].float(), torch.einsum("hl,lhd->hd", a, v), atol=2e-2, rtol=2e-2)


@cuda
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt-oss"])
def test_attention_reduce_fusion_changes_no_token(name):
    """The attention's split combine in its last program instead of a reduce kernel: the same greedy tokens
    (fp32, CUDA graphs, batch 1 with key splits and batch 4)."""
    import giants
    from giants.inference.engine import Engine

    model = giants.build(giants.get_config(name), seed=0).to("cuda", torch.float32).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 49152, (int(n),), generator=g).tolist() for n in (6, 33, 80, 12)]
    outs = []
    for fuse in (False, True):
        engine = Engine(model, block_size=16, num_blocks=128, max_model_len=256, max_num_seqs=4)
        engine.runner.fuse_attn_reduce = fuse
        outs.append(([_run_one(engine, p) for p in prompts[:2]], _run_all(engine, prompts, 16)))
    assert outs[1] == outs[0]
