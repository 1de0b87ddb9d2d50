"""Layer placement (device_map): planning, refusals, and placed models that compute exactly what unplaced ones do.

On a CPU-only machine blocks placed on "disk" are streamed (store -> slot copy before the block runs, dropped
after) by the same code that streams host-memory blocks to a GPU, so these tests run the streaming path.
"""

from __future__ import annotations

import pytest
import torch

import giants
from giants.inference import LLM, SamplingParams
from giants.inference.engine import Engine
from giants.inference.llm import random_model
from giants.inference.placement import (
    dispatch,
    infer_device_map,
    init_random,
    materialize,
    parse_size,
    plan_units,
    resolve_device_map,
    unit_sizes,
)
from giants.model.transformer import build
from giants.presets import PRESETS, TINY_PRESETS

from conftest import cuda

GiB = 2**30


@pytest.fixture(autouse=True)
def _no_default_tokenizer(monkeypatch):
    from giants.inference import llm as llm_mod

    monkeypatch.setattr(llm_mod, "_default_tokenizer", lambda m: None)


def _assert_same_greedy(want, got, tol: float = 2e-3) -> None:
    """Greedy outputs (with logprobs=2) of a placed model against the unplaced one. Where the placed part
    computes on another device (CPU vs GPU: another summation order), a random tiny model's near-tied top two
    may swap: tokens must agree up to the first step where the reference's top-2 margin is below `tol`, and
    every shared step's logprob must agree within `tol`."""
    for w, g in zip(want, got):
        w, g = w.outputs[0], g.outputs[0]
        n = next((i for i, (a, b) in enumerate(zip(w.token_ids, g.token_ids)) if a != b), len(w.token_ids))
        for i in range(n):
            t = w.token_ids[i]
            assert abs(w.logprobs[i][t] - g.logprobs[i][t]) < tol, (i, w.logprobs[i], g.logprobs[i])
        if n < len(w.token_ids):
            top = sorted(w.logprobs[n].values(), reverse=True)
            assert top[0] - top[1] < tol, f"tokens differ at step {n} where the reference's margin is {top[0] - top[1]}"


def _meta(name: str, dtype: torch.dtype = torch.float32):
    return build(PRESETS[name].config, device="meta").to(dtype)


def _spill_budget(name: str) -> int:
    """A CPU budget below the model's size: some blocks (all, for 2-block twins) spill to the streamed store."""
    sizes = unit_sizes(_meta(name))
    layers = [s for n, s in sizes.items() if n.startswith("layers.")]
    rest = sum(s for n, s in sizes.items() if not n.startswith("layers."))
    return rest + int(layers[0] * (3.5 if len(layers) > 2 else 1.5))


def _mixed_map(name: str) -> dict:
    """Every other block streamed from disk, the rest in CPU memory (accelerate's dict format)."""
    n = PRESETS[name].config.n_layers
    out: dict = {"": "cpu"}
    out.update({f"layers.{i}": "disk" for i in range(0, n, 2)})
    return out


# ---- sizes, devices, planning ---------------------------------------------------------------------------
def test_parse_size():
    assert parse_size("70GiB") == 70 * GiB
    assert parse_size("200GB") == 200 * 10**9
    assert parse_size("1.5 MiB") == 3 * 2**19
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")


def test_plan_sequential_fills_gpus_in_order_and_spills_to_cpu_then_disk():
    sizes = {"embed": 10, **{f"layers.{i}": 20 for i in range(8)}, "norm": 1, "lm_head": 10}
    plan = plan_units(sizes, {"cuda:0": 80, "cuda:1": 80, "cpu": 50}, "sequential")
    assert plan["embed"] == "cuda:0" and plan["lm_head"] == plan["norm"] == "cuda:1"  # head on the last GPU
    # streaming is needed, so 2 x the largest block (40) stay free on cuda:0: 80 - 10 - 40 = 30 -> 1 block
    assert [plan[f"layers.{i}"] for i in range(8)] == ["cuda:0"] + ["cuda:1"] * 3 + ["cpu"] * 2 + ["disk"] * 2
    # everything fits: no slot reserve, nothing streamed
    plan = plan_units(sizes, {"cuda:0": 200, "cpu": 0}, "sequential")
    assert set(plan.values()) == {"cuda:0"}


def test_plan_balanced_spreads_blocks_over_gpus():
    sizes = {"embed": 10, **{f"layers.{i}": 20 for i in range(8)}, "norm": 1, "lm_head": 10}
    seq = plan_units(sizes, {"cuda:0": 500, "cuda:1": 500, "cpu": 0}, "sequential")
    bal = plan_units(sizes, {"cuda:0": 500, "cuda:1": 500, "cpu": 0}, "auto")
    assert all(seq[f"layers.{i}"] == "cuda:0" for i in range(8))
    on0 = sum(bal[f"layers.{i}"] == "cuda:0" for i in range(8))
    assert 3 <= on0 <= 5, bal  # per GPU: 181 // 2 + 1.25 * 20 = 115 -> embed + 5 blocks on cuda:0


def test_auto_on_cpu_spills_blocks_to_disk():
    plan = infer_device_map(_meta("tiny-gemma2"), {"cpu": _spill_budget("tiny-gemma2")})
    blocks = [plan[f"layers.{i}"] for i in range(4)]
    assert blocks == ["cpu", "disk", "disk", "disk"] and plan["embed"] == plan["norm"] == "cpu"


def test_device_map_dict_is_checked_and_names_what_is_wrong():
    meta = _meta("tiny-llama")
    ok = resolve_device_map(meta, {"embed": "cpu", "layers": "cpu", "layers.1": "disk", "norm": "cpu",
                                   "lm_head": "cpu"})
    assert ok["layers.0"] == "cpu" and ok["layers.1"] == "disk"
    for bad, match in [({"": "cpu", "layers.7": "cpu"}, "unknown module 'layers.7'"),
                       ({"": "cpu", "layers.0.mlp": "cpu"}, "inside block 'layers.0'"),
                       ({"embed": "cpu", "layers": "cpu"}, "no device for norm"),
                       ({"": "cpu", "layers.0": "mps"}, r"device_map\['layers.0'\]: unknown device 'mps'"),
                       ({"": "cpu", "layers.0": 64}, r"device_map\['layers.0'\]: device 64 does not exist"),
                       ({"": "cpu", "embed": "disk"}, "'disk' is only for blocks")]:
        with pytest.raises(ValueError, match=match):
            resolve_device_map(meta, bad)
    tied = _meta("tiny-gemma2")
    assert tied.lm_head is None
    with pytest.raises(ValueError, match="ties its head"):
        resolve_device_map(tied, {"": "cpu", "lm_head": "cpu"})
    with pytest.raises(ValueError, match="unknown strategy"):
        resolve_device_map(meta, "everywhere")
    with pytest.raises(ValueError, match="offload_folder"):
        materialize(_meta("tiny-llama"), {"": "cpu", "layers.1": "disk"})


# ---- placed models compute exactly what unplaced ones do -------------------------------------------------
@pytest.mark.parametrize("name", TINY_PRESETS)
def test_placed_forward_logits_equal_unplaced(name, tmp_path):
    ref = random_model(name, torch.device("cpu"), torch.float32, seed=0)
    ids = torch.randint(0, ref.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids)
    for i, (device_map, max_memory) in enumerate([(_mixed_map(name), None),
                                                  ("auto", {"cpu": _spill_budget(name)})]):
        m = materialize(_meta(name), device_map, max_memory, offload_folder=tmp_path / str(i))
        assert any(m.placement.streamed)
        init_random(m, 0, torch.device("cpu"))  # the same draws as the unplaced model
        for (k, a), b in zip(ref.state_dict().items(), m.state_dict().values()):
            assert torch.equal(a, b), k
        with torch.no_grad():
            assert torch.equal(m.eval()(ids), want), (name, device_map)
            assert torch.equal(m(ids), want)  # a second pass: blocks come back from the slots / the store


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss"])
def test_placed_engine_logprobs_equal_unplaced(name, tmp_path):
    """The engine's ModelRunner over a placed model (streamed blocks with their fused views) gives the same
    logprobs, bit for bit, as over the unplaced model, through prefill, decode and a prefix-cache hit."""
    placed = dispatch(random_model(name, torch.device("cpu"), torch.float32, seed=0), _mixed_map(name),
                      offload_folder=tmp_path)
    ref = random_model(name, torch.device("cpu"), torch.float32, seed=0)
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    prompts = [[5, 17, 300, 42, 7, 99, 1000, 3, 8, 9, 10, 11, 12, 13, 14, 15, 16], [11, 12, 13], [5, 17, 300, 42]]
    outs = []
    for model in (ref, placed):
        eng = Engine(model, num_blocks=64, max_model_len=128, max_num_seqs=4, block_size=4, cpu_onednn=False)
        for j, p in enumerate(prompts):
            eng.add_request(str(j), p, sp)
        done = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = (o.outputs[0].token_ids, o.outputs[0].logprobs)
        outs.append(done)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_llm_with_device_map_generates_the_same_tokens(name, tmp_path):
    kw = dict(dtype="float32", num_blocks=64, max_model_len=128, max_num_seqs=4)
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [[5, 17, 300, 42, 7, 99, 1000, 3], [11, 12, 13]]
    want = [o.outputs[0].token_ids for o in LLM(name, **kw).generate(prompts, sp)]
    llm = LLM(name, device_map="auto", max_memory={"cpu": _spill_budget(name)}, offload_folder=tmp_path, **kw)
    assert any(llm.model.placement.streamed)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp)] == want


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2"])
def test_load_writes_weights_straight_to_their_placement(name, tmp_path):
    ref = random_model(name, torch.device("cpu"), torch.float32, seed=3)
    giants.save(ref, tmp_path / "ckpt")
    m = giants.load(tmp_path / "ckpt", device_map=_mixed_map(name), offload_folder=tmp_path / "off")
    pl = m.placement
    for i in pl.order:  # the streamed blocks' weights live in their files, not in the module
        assert (tmp_path / "off" / f"layers.{i}.bin").stat().st_size == pl.layouts[i].nbytes
        w = m.layers[i].attn.o_proj.weight
        assert w.untyped_storage().data_ptr() == pl.stores[i].untyped_storage().data_ptr()
    ids = torch.randint(0, ref.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(m(ids), ref.eval()(ids))


def test_streaming_reuses_a_slot_that_holds_the_block(tmp_path):
    """One streamed block: copied in once, then found in its slot on every later step."""
    m = dispatch(random_model("tiny-llama", torch.device("cpu"), torch.float32, seed=0),
                 {"": "cpu", "layers.1": "disk"}, offload_folder=tmp_path)
    pl, loads = m.placement, []
    orig = pl._load
    pl._load = lambda i, slot: (loads.append(i), orig(i, slot))
    with torch.no_grad():
        for _ in range(3):
            m(torch.tensor([[1, 2, 3]]))
    assert loads == [1]


def test_runners_other_than_the_generic_one_refuse_a_placed_model(tmp_path):
    from giants.inference.kv_cache import KVCacheManager
    from giants.inference.runner import ModelRunner

    m = dispatch(random_model("tiny-llama", torch.device("cpu"), torch.float32, seed=0),
                 {"": "cpu", "layers.1": "disk"}, offload_folder=tmp_path)
    kv = KVCacheManager(m.config, block_size=4, num_blocks=8, max_model_len=32, dtype=torch.float32,
                        device=torch.device("cpu"))

    class GraphRunner(ModelRunner):
        pass

    with pytest.raises(ValueError, match="CUDA graphs"):
        GraphRunner(m, kv)
    with pytest.raises(ValueError, match="cpu_compile"):
        ModelRunner(m, kv).compile_decode()


# ---- on a GPU (the lead's H100 run) --------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral", "tiny-gpt-oss"])
def test_cuda_offloaded_blocks_stream_from_pinned_memory(name):
    """Blocks on "cpu" with a GPU in the map are streamed (pinned store -> GPU slot, side stream, prefetch):
    logits equal the GPU-resident model's (to fp32 rounding: the MoE combine's index_add_ is atomic on CUDA, so
    top-4 routing is not bit-reproducible even unplaced), and greedy tokens through LLM equal."""
    ref = random_model(name, torch.device("cuda"), torch.float32, seed=0)
    n = ref.config.n_layers
    device_map = {"": 0, **{f"layers.{i}": "cpu" for i in range(1, n)}}
    m = materialize(_meta(name), device_map)
    init_random(m, 0, torch.device("cuda"))
    assert m.placement.stores[1].is_pinned()
    ids = torch.randint(0, ref.config.vocab_size, (2, 9), device="cuda")
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(m.eval()(ids), ref.eval()(ids))
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    kw = dict(dtype="float32", num_blocks=64, max_model_len=128, max_num_seqs=4, use_cuda_graphs=False)
    want = LLM(name, **kw).generate([[5, 6, 7, 8]], sp)
    llm = LLM(name, device_map=device_map, **kw)
    _assert_same_greedy(want, llm.generate([[5, 6, 7, 8]], sp))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2", "tiny-gpt-oss-described"])
def test_cuda_blocks_spread_over_two_gpus_with_one_streamed(name):
    """Blocks on GPU 0 and GPU 1 (activations, rotary tables, T5 bias and KV pools follow them) and one block
    streamed from host memory: logits and greedy tokens equal the one-GPU model's."""
    ref = random_model(name, torch.device("cuda:0"), torch.float32, seed=0)
    n = ref.config.n_layers
    device_map: dict = {"": 0, **{f"layers.{i}": 1 for i in range(n // 2, n)}, "norm": 1, "layers.0": "cpu"}
    if ref.lm_head is not None:
        device_map["lm_head"] = 1
    m = materialize(_meta(name), device_map)
    init_random(m, 0, torch.device("cuda:0"))
    assert m.layers[n - 1].attn.o_proj.weight.device == torch.device("cuda:1") and m.placement.streamed[0]
    ids = torch.randint(0, ref.config.vocab_size, (2, 9), device="cuda:0")
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(ids), ref.eval()(ids))
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    kw = dict(dtype="float32", num_blocks=64, max_model_len=128, max_num_seqs=4, use_cuda_graphs=False)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]
    want = LLM(name, **kw).generate(prompts, sp)
    llm = LLM(name, device_map=device_map, **kw)
    assert {str(k.device) for g in llm.engine.kv.groups for k in g.k} == {"cuda:0", "cuda:1"}
    _assert_same_greedy(want, llm.generate(prompts, sp))


@cuda
def test_cuda_embedding_and_head_on_the_cpu_blocks_on_the_gpu():
    """One GPU with embed/norm/head kept in host memory (they run on the CPU): the engine works on the
    embedding's device (the CPU), the KV pools move to the blocks' GPU, step inputs follow each block."""
    name = "tiny-llama"
    device_map = {"": 0, "embed": "cpu", "norm": "cpu", "lm_head": "cpu", "layers.1": "cpu"}
    kw = dict(dtype="float32", num_blocks=64, max_model_len=128, max_num_seqs=4, use_cuda_graphs=False)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]
    want = LLM(name, **kw).generate(prompts, sp)
    llm = LLM(name, device_map=device_map, **kw)
    assert llm.engine.device.type == "cpu" and llm.model.placement.streamed == [False, True]
    assert {str(k.device) for g in llm.engine.kv.groups for k in g.k} == {"cuda:0"}
    _assert_same_greedy(want, llm.generate(prompts, sp))
