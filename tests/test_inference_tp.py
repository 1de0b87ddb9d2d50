"""Tensor-parallel inference on the CPU (gloo): LLM(..., tensor_parallel_size=N) gives the same greedy tokens as
one process for every family's tiny twin, with continuous batching, prefix caching and preemption at work; a
dead worker is named within seconds and leaves no process behind; `giants serve --tensor-parallel-size 2`
answers the openai client and SIGTERM stops its workers."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from giants import get_config
from giants.inference import LLM, SamplingParams
from giants.inference.executor import TPWorkerError
from giants.parallel.layout import LayoutError

ALL_TINY = ("tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss", "tiny-gpt-oss-described")

# A shared 24-token prefix (6 blocks of 4: prefix-cache hits), lengths 27..41, 16 new tokens each; 16 blocks
# of 4 cannot hold the four sequences at full length (nor, for Mixtral, their windows), so the engine
# preempts and recomputes.
PREFIX = [(i * 37 + 11) % 4000 + 100 for i in range(24)]
PROMPTS = [PREFIX + [5000 + i for i in range(n)] for n in (3, 17, 9, 11)] + [[42] * 6]
ENGINE = dict(block_size=4, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=64)
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

_REF: dict[str, list[list[int]]] = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except OSError:
        return False


def _workers_of(pid: int) -> list[int]:
    """The tensor-parallel worker processes whose parent is `pid` (from /proc: psutil may be absent)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
                if parent == pid and b"giants.inference.tp_worker" in cmd:
                    out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _all_gone(pids: list[int], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


def _generate(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _reference(name: str) -> list[list[int]]:
    if name not in _REF:
        llm = LLM(name, dtype="float32", device="cpu", **ENGINE)
        _REF[name] = _generate(llm)
        assert llm.engine.num_preemptions > 0 and llm.engine.kv.prefix_hits > 0
    return _REF[name]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ALL_TINY)
def test_tp_same_greedy_tokens_as_one_process(name, tp):
    """tp=4 on the twins with 2 KV heads replicates each KV head on two ranks (vLLM's rule)."""
    ref = _reference(name)
    llm = LLM(name, dtype="float32", device="cpu", tensor_parallel_size=tp, **ENGINE)
    try:
        assert llm.model.config.n_heads == get_config(name).n_heads // tp  # rank 0 holds its heads only
        got = _generate(llm)
        assert got == ref
        eng = llm.engine
        assert eng.num_preemptions > 0, "the small KV budget should force preemption"
        assert eng.kv.prefix_hits > 0, "the shared prefix should hit the prefix cache"
        pids = llm.executor.pids
        assert len(pids) == tp - 1 and all(_alive(p) for p in pids)
    finally:
        llm.executor.close()
    assert not any(_alive(p) for p in pids)


def test_tp_refuses_what_does_not_divide():
    with pytest.raises(LayoutError, match="n_heads=4"):
        LLM("tiny-llama", device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="cpu_compile"):
        LLM("tiny-llama", device="cpu", tensor_parallel_size=2, cpu_compile=True)


def test_tp_in_memory_transformer_and_stream():
    """A Transformer object is sliced by rank 0 and its shares handed to the workers; stream() works too."""
    from giants import build

    model = build(get_config("tiny-gemma2"), seed=3).eval()
    ref = LLM(model, device="cpu", **ENGINE)
    want = _generate(ref)
    llm = LLM(model, device="cpu", tensor_parallel_size=2, **ENGINE)
    try:
        assert _generate(llm) == want
        toks = [t for out in llm.stream(PROMPTS[0], GREEDY) for t in out.outputs[0].new_token_ids]
        assert toks == want[0]
    finally:
        llm.executor.close()


def test_killed_worker_named_within_seconds_and_no_process_left():
    llm = LLM("tiny-llama", dtype="float32", device="cpu", tensor_parallel_size=2, **ENGINE)
    pid = llm.executor.pids[0]
    ex = llm.executor
    sent = ex.send

    def send_then_kill(buf: bytes) -> None:
        sent(buf)
        if buf[:1] == b"S":  # the step is on its way: rank 0 now meets a dead peer inside the collectives
            os.kill(pid, signal.SIGKILL)

    ex.send = send_then_kill
    t0 = time.monotonic()
    with pytest.raises(TPWorkerError, match=r"rank 1 \(pid \d+\) died \(killed by SIGKILL\)"):
        llm.generate(PROMPTS, GREEDY)
    assert time.monotonic() - t0 < 10
    assert not _alive(pid)
    with pytest.raises(TPWorkerError, match="rank 1"):  # every later call fails at once, naming the rank
        llm.generate(PROMPTS[:1], GREEDY)


def test_worker_killed_while_idle_is_reported():
    llm = LLM("tiny-llama", dtype="float32", device="cpu", tensor_parallel_size=4, **ENGINE)
    pids = llm.executor.pids
    seen = threading.Event()
    llm.executor.on_failure(lambda msg: seen.set())
    os.kill(pids[1], signal.SIGKILL)  # rank 2
    assert seen.wait(10), "the watcher should report the death without any call"
    assert all(not _alive(p) for p in pids), "the other workers are stopped with it"
    with pytest.raises(TPWorkerError, match="rank 2"):
        llm.generate(PROMPTS[:1], GREEDY)


def test_serve_tensor_parallel_openai_client_and_sigterm():
    openai = pytest.importorskip("openai")
    from giants.serve.launch import ServerProcess

    with ServerProcess("tiny-llama", "--tensor-parallel-size", "2", "--dtype", "float32", "--device", "cpu") as srv:
        ref = LLM("tiny-llama", dtype="float32", device="cpu")
        if ref.tokenizer is None:
            pytest.skip("no cached SmolLM2 tokenizer: the server needs one for text")
        client = openai.OpenAI(base_url=srv.base_url, api_key="none")
        r = client.completions.create(model="tiny-llama", prompt="The capital of France is", max_tokens=8,
                                      temperature=0.0)
        want = ref.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0.0))[0]
        assert r.choices[0].text == want.outputs[0].text
        workers = _workers_of(srv.proc.pid)
        assert len(workers) == 1 and all(_alive(p) for p in workers)
        srv.terminate()
        assert srv.wait(30) == 0
    assert _all_gone(workers)


def test_serve_exits_naming_a_killed_worker():
    from giants.serve.launch import ServerProcess

    with ServerProcess("tiny-llama", "--tensor-parallel-size", "2", "--dtype", "float32", "--device", "cpu") as srv:
        workers = _workers_of(srv.proc.pid)
        assert workers
        t0 = time.monotonic()
        os.kill(workers[0], signal.SIGKILL)
        code = srv.wait(10)
        assert code == 1 and time.monotonic() - t0 < 10
        assert "tensor-parallel worker rank 1" in srv.log() and "killed by SIGKILL" in srv.log()
    assert _all_gone(workers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fast", [False, True])
def test_tp_cuda_matches_one_process(fast, monkeypatch):  # pragma: no cover - GPU machines
    """Generic runner by default; GIANTS_TP_CUDA_FAST=1: CudaModelRunner on local shapes, NCCL in the graphs."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    if fast:
        monkeypatch.setenv("GIANTS_TP_CUDA_FAST", "1")
    ref = LLM("tiny-llama", dtype="float32", device="cuda", **ENGINE)
    want = _generate(ref)
    llm = LLM("tiny-llama", dtype="float32", device="cuda", tensor_parallel_size=2, **ENGINE)
    try:
        assert _generate(llm) == want
        assert (type(llm.engine.runner.local).__name__ == "TPCudaModelRunner") == fast
    finally:
        llm.executor.close()
