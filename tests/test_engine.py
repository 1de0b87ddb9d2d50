"""The engine against one-at-a-time greedy generation on every tiny twin.

Reference: the plain model with `model.make_cache`, one request at a time, prefill then one token per
forward. The engine runs 16 requests of mixed lengths (several longer than the sliding window of 16)
joining between steps, in block-size-4 pages, once with room to spare and once with a block budget
so small that sequences are preempted and recomputed, chunked prefill, and shared prompt prefixes
that must hit the prefix cache.
"""

from __future__ import annotations

import pytest
import torch

import giants
from giants.inference import SamplingParams
from giants.inference.engine import Engine

from conftest import ALL_TINY

NEW_TOKENS = 10


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    cache = model.make_cache(1, len(prompt) + n + 1)
    out: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
        for i in range(n):
            t = int(logits[0, -1].argmax())
            out.append(t)
            logits = model(torch.tensor([[t]]), torch.tensor([[len(prompt) + i]]), cache)
    return out


def make_prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 49152, (37,), generator=g).tolist()  # a common "system prompt"
    prompts = []
    for i in range(16):
        n = int(torch.randint(1, 56, (1,), generator=g))
        own = torch.randint(3, 49152, (n,), generator=g).tolist()
        prompts.append(shared + own[: n // 3] if i % 3 == 0 else own)
    return prompts


def run_engine(engine: Engine, prompts: list[list[int]], params: SamplingParams, stagger: int = 4):
    """Adds `stagger` requests, steps, adds more between steps: requests join a running batch."""
    results: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        for _ in range(min(stagger, len(pending))):
            i, p = pending.pop(0)
            engine.add_request(str(i), p, params)
        for out in engine.step():
            assert out.request_id not in results
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
    return [results[str(i)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def prompts():
    return make_prompts()


@pytest.mark.parametrize("name", ALL_TINY)
def test_engine_matches_one_at_a_time_greedy(name, prompts):
    model = giants.build(giants.get_config(name), seed=0).eval()
    ref = [reference_greedy(model, p, NEW_TOKENS) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)

    roomy = Engine(model, block_size=4, num_blocks=1024)
    assert run_engine(roomy, prompts, params) == ref
    assert roomy.stats()["kv_blocks_used"] == 0

    # ~6 sequences' worth of blocks for 16 requests, 24-token steps: chunked prefill and preemption.
    tight = Engine(model, block_size=4, num_blocks=36, max_num_batched_tokens=24)
    assert run_engine(tight, prompts, params, stagger=16) == ref
    s = tight.stats()
    assert s["num_preemptions"] > 0, s
    assert s["prefix_cache_hits"] > 0, s
    assert s["kv_blocks_used"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0


def test_prefix_cache_hits_on_shared_prompt():
    model = giants.build(giants.get_config("tiny-gemma2"), seed=0).eval()
    g = torch.Generator().manual_seed(3)
    system = torch.randint(3, 49152, (40,), generator=g).tolist()
    prompts = [system + torch.randint(3, 49152, (5 + i,), generator=g).tolist() for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine = Engine(model, block_size=4, num_blocks=256)
    got = []
    for i, p in enumerate(prompts):  # one after another: each later request finds the system prompt cached
        engine.add_request(str(i), p, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    got.append(out.outputs[0].token_ids)
                    if i:
                        assert out.metrics.num_cached_tokens == 40
    assert engine.stats()["prefix_cache_hits"] == 3 * 40
    assert got == [reference_greedy(model, p, 6) for p in prompts]


def test_sliding_window_layers_release_blocks():
    model = giants.build(giants.get_config("tiny-mixtral"), seed=0).eval()  # every layer has window 16
    engine = Engine(model, block_size=4, num_blocks=64)
    prompt = list(range(10, 70))
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    peak = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        peak = max(peak, engine.stats()["kv_blocks_used"])
        if outs and outs[0].finished:
            assert outs[0].outputs[0].token_ids == reference_greedy(model, prompt, 30)
    # 90 positions would need 23 blocks; the window (16) plus one prefill chunk keeps far fewer.
    assert peak <= 16 + 2, peak


def test_bad_requests_fail_alone():
    model = giants.build(giants.get_config("tiny-llama"), seed=0).eval()
    engine = Engine(model, block_size=4, num_blocks=64, max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("ok", [5, 6, 7], params)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request("long", list(range(3, 80)), params)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request("empty", [], params)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request("bad", [5, 49152], params)
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("ok", [5], params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    assert list(done) == ["ok"] and done["ok"].token_ids == reference_greedy(model, [5, 6, 7], 4)
    assert done["ok"].finish_reason == "length"


def test_abort_frees_blocks_and_max_model_len_stops():
    model = giants.build(giants.get_config("tiny-llama"), seed=0).eval()
    engine = Engine(model, block_size=4, num_blocks=64, max_model_len=20)
    engine.add_request("a", list(range(3, 20)), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    engine.add_request("b", list(range(3, 15)), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    engine.abort_request("b")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [o.request_id for o in outs if o.finished] == ["a"]
    final = [o for o in outs if o.finished][0].outputs[0]
    assert final.finish_reason == "length" and len(final.token_ids) == 20 - 17
    s = engine.stats()
    assert s["kv_blocks_used"] == 0 and s["num_running"] == 0


def test_eos_and_stop_token_ids():
    model = giants.build(giants.get_config("tiny-llama"), seed=0).eval()
    prompt = [5, 6, 7, 8]
    ref = reference_greedy(model, prompt, 8)
    engine = Engine(model, block_size=4, num_blocks=64)
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[ref[3]]))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    first = ref.index(ref[3])
    comp = outs[-1].outputs[0]
    assert comp.token_ids == ref[:first + 1] and comp.finish_reason == "stop" and comp.stop_reason == ref[3]
    # the config's EOS ends a sequence unless ignore_eos
    cfg_eos = model.config.replace(eos_token_id=ref[2])
    model2 = giants.build(cfg_eos, seed=0).eval()
    engine = Engine(model2, block_size=4, num_blocks=64)
    engine.add_request("e", prompt, SamplingParams(temperature=0, max_tokens=8))
    engine.add_request("i", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0]
    assert done["e"].token_ids == ref[:ref.index(ref[2]) + 1] and done["e"].finish_reason == "stop"
    assert done["i"].token_ids == ref and done["i"].finish_reason == "length"


def test_request_too_big_for_cache_is_refused_and_growth_past_capacity_ends_with_length():
    model = giants.build(giants.get_config("tiny-llama"), seed=0).eval()
    engine = Engine(model, block_size=4, num_blocks=5)  # 20 token slots in total
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request("big", list(range(3, 40)), SamplingParams(max_tokens=2))
    engine.add_request("grow", list(range(3, 15)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.add_request("other", list(range(3, 9)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    finished = {}
    for _ in range(200):
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o.outputs[0]
        if not engine.has_unfinished_requests():
            break
    assert set(finished) == {"grow", "other"}
    assert all(c.finish_reason == "length" for c in finished.values())
    assert engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2", "tiny-gpt-oss"])
def test_async_decode_launches_ahead_and_matches_reference(name, prompts):
    """Decode steps launched before the previous step's tokens are read (the CUDA-graph default, forced
    here on the CPU path) give the reference tokens: with sequences stopping on a token mid-batch (the
    step launched ahead is dropped), requests joining, an abort, and preemption under a tiny block budget."""
    model = giants.build(giants.get_config(name), seed=0).eval()
    n_new = 20
    ref = [reference_greedy(model, p, n_new) for p in prompts]
    # every third request stops at its 9th reference token (or the first earlier copy of it)
    stops = {i: r[8] for i, r in enumerate(ref) if i % 3 == 1}
    want = [r[:r.index(stops[i]) + 1] if i in stops else r for i, r in enumerate(ref)]
    for kw in ({"num_blocks": 1024}, {"num_blocks": 36, "max_num_batched_tokens": 24}):
        engine = Engine(model, block_size=4, async_decode=True, **kw)
        assert engine.async_decode
        results: dict[str, list[int]] = {}
        pending = list(enumerate(prompts))
        steps = 0
        while pending or engine.has_unfinished_requests():
            for _ in range(min(4, len(pending))):
                i, p = pending.pop(0)
                engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True,
                                                             stop_token_ids=[stops[i]] if i in stops else []))
            if steps == 0:
                engine.add_request("gone", prompts[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
            for out in engine.step():
                if out.finished and out.request_id != "gone":
                    results[out.request_id] = out.outputs[0].token_ids
            steps += 1
            if steps == 12:
                engine.abort_request("gone")
        assert [results[str(i)] for i in range(len(prompts))] == want
        assert engine.num_ahead_used > 0, kw
        s = engine.stats()
        assert s["kv_blocks_used"] == 0 and s["num_running"] == 0
    # two sequences, one stopping on a token while the other goes on: the step launched ahead for both is
    # dropped, the survivor recomputes that position and still matches
    engine = Engine(model, block_size=4, num_blocks=256, async_decode=True)
    engine.add_request("stop", prompts[1], SamplingParams(temperature=0, max_tokens=n_new, stop_token_ids=[ref[1][8]]))
    engine.add_request("go", prompts[2], SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert done == {"stop": want[1], "go": ref[2]}
    assert engine.num_ahead_dropped >= 1 and engine.num_ahead_used > 10, (engine.num_ahead_used,
                                                                          engine.num_ahead_dropped)
    assert Engine(model, block_size=4, num_blocks=64).async_decode is False  # CPU default: off


def test_prefix_block_key_is_a_sha256_chain():
    """A block's key is sha256(parent key || token ids as int64 little-endian), the first block's parent 32 zero
    bytes: a collision-resistant chain, where Python's 64-bit `hash` of (parent hash, tokens) could be made to
    collide and hand one prompt's cached KV to another."""
    import hashlib
    import struct

    from giants.inference.kv_cache import ROOT_KEY, KVCacheManager, SeqBlocks, block_key

    toks = (1, 2, 70000, 2**40)
    first = block_key(None, toks)
    assert ROOT_KEY == bytes(32)
    assert first == hashlib.sha256(bytes(32) + struct.pack("<4q", *toks)).digest()
    assert first == hashlib.sha256(bytes(32) + b"".join(t.to_bytes(8, "little") for t in toks)).digest()
    second = block_key(first, (5, 6, 7, 8))
    assert second == hashlib.sha256(first + struct.pack("<4q", 5, 6, 7, 8)).digest()
    assert isinstance(second, bytes) and len(second) == 32
    # different tokens, different parents, token order, and a token split across blocks all give different keys
    keys = {first, second, block_key(None, (1, 2, 70000, 2**40 + 1)), block_key(second, (5, 6, 7, 8)),
            block_key(None, (2, 1, 70000, 2**40)), block_key(block_key(None, (1, 2)), (70000, 2**40))}
    assert len(keys) == 6
    # the manager keys a sequence's full blocks by that chain
    kv = KVCacheManager(giants.get_config("tiny-llama"), block_size=4, num_blocks=8, max_model_len=64,
                        dtype=torch.float32, device=torch.device("cpu"))
    blocks = SeqBlocks(len(kv.groups))
    ids = list(range(10, 21))
    assert kv._keys(blocks, ids, 2) == [block_key(None, (10, 11, 12, 13)),
                                        block_key(block_key(None, (10, 11, 12, 13)), (14, 15, 16, 17))]


def test_every_end_token_the_tokenizer_names_stops_a_request():
    """A tokenizer's eos_token_ids (generation_config.json's list: gpt-oss names <|call|> there, not in
    config.json) end generation as the config's eos does."""
    from types import SimpleNamespace

    from giants.inference.engine import _eos_ids

    model = giants.build(giants.get_config("tiny-llama"), seed=0).eval()
    prompt, sp = [5, 6, 7, 8], SamplingParams(max_tokens=8, temperature=0.0)
    free = reference_greedy(model, prompt, 8)
    stop = free[3]  # the 4th greedy token, named only by the tokenizer's list
    assert stop not in free[:3]
    tok = SimpleNamespace(eos_token_id=None, eos_token_ids=(stop,), decode=lambda ids, **kw: " ".join(map(str, ids)))
    assert stop in _eos_ids(model, tok) and stop not in _eos_ids(model, None)
    engine = Engine(model, tok, block_size=4, num_blocks=64)
    engine.add_request("r", prompt, sp)
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] = o
    assert out["r"].outputs[0].token_ids == free[:4] and out["r"].outputs[0].finish_reason == "stop"
