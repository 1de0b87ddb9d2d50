"""One tensor-parallel rank's step: `ModelRunner` over the rank's local modules, plus the collectives.

The local model holds this rank's heads, KV heads, FFN columns (experts' F columns for MoE) and vocabulary
rows; its KV pool holds only its KV heads, under the same block ids on every rank (the engine's tables).
Per step and layer: all-reduce after o_proj and after the MLP (before Gemma's post-norms), the
vocab-parallel embedding (each rank looks up the ids in its rows, zeros elsewhere, then all-reduce) and the
vocab-parallel head (local logits, soft-capped, gathered along the vocabulary).

`Comm` wraps the process group. On rank 0 a wait gives up as soon as the executor reports a dead worker
(waits are sliced, the executor's health check runs between slices), so a collective on a dead peer raises
a named error within about a second instead of hanging until the group's timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import torch

from giants.inference.kv_cache import KVCacheManager, SeqBlocks
from giants.inference.runner import Chunk, ModelRunner
from giants.model.transformer import Transformer

WAIT_SLICE = timedelta(seconds=0.5)


class Comm:
    """Collectives of one rank on a c10d process group (gloo on CPU, NCCL on GPUs)."""

    def __init__(self, pg, rank: int, world: int, device: torch.device,
                 health: Callable[..., None] | None = None, timeout_s: float = 600.0) -> None:
        self.pg, self.rank, self.world, self.device = pg, rank, world, device
        self.health = health  # raises when a peer is known dead (rank 0); None: plain waits (workers)
        self.timeout_s = timeout_s
        self.cuda = device.type == "cuda"

    def _wait(self, work) -> None:
        if self.health is None or self.cuda:
            work.wait()  # NCCL: orders the stream only; rank 0 checks health at its host sync (`sync`)
            return
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                work.wait(WAIT_SLICE)
                return
            except RuntimeError as e:
                if "timed out" not in str(e).lower():  # e.g. "Connection reset by peer": which rank died?
                    self.health(2.0)
                    raise
            self.health()
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel collective did not finish within {self.timeout_s:.0f} s")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._wait(self.pg.allreduce([t]))
        return t

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        t = t.contiguous()
        outs = [torch.empty_like(t) for _ in range(self.world)]
        self._wait(self.pg.allgather([outs], [t]))
        return torch.cat(outs, dim=dim)

    def sync(self) -> None:
        """Rank 0 on CUDA: wait for the step on the host, giving up when a worker died (a hung NCCL kernel
        would otherwise block the next read-back forever)."""
        if not self.cuda:
            return
        ev = torch.cuda.Event()
        ev.record()
        delay = 2e-5
        while not ev.query():
            if self.health is not None:
                self.health()
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)


class TPHooks:
    """The tensor-parallel overrides of the runner hooks (see ModelRunner._embed/_reduce/_gather_vocab)."""

    comm: Comm
    vocab_start: int
    vocab_rows: int
    model: Transformer

    def compile_decode(self) -> None:
        raise ValueError("cpu_compile: the compiled CPU decode is for one process; not with tensor_parallel_size > 1")

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.vocab_rows)
        x = self.model.embed(torch.where(inside, local, 0))
        x = x * inside[:, None].to(x.dtype)  # other ranks' ids: exact zeros, so the sum is the one row
        return self.comm.all_reduce(x)

    def _reduce(self, h: torch.Tensor | tuple) -> torch.Tensor:
        if not isinstance(h, torch.Tensor):  # CudaModelRunner's ExpertRows (a MoE layer's rows before the combine,
            # which the next norm kernel would do): combine here, as the all-reduce sums finished outputs
            y = h.y.view(-1, h.k, h.y.shape[-1]).float()
            h = (y * h.weights.view(-1, h.k, 1).float()).sum(1).to(h.y.dtype)
        return self.comm.all_reduce(h.contiguous())

    def _gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] == 0:  # nothing sampled this step (same on every rank: same chunks)
            return logits.new_empty(0, logits.shape[1] * self.comm.world)
        return self.comm.all_gather(logits, dim=-1)


class TPModelRunner(TPHooks, ModelRunner):
    """ModelRunner on a rank's shard; `vocab_start` is the first vocabulary row this rank holds."""

    supports_ahead = True

    def __init__(self, model: Transformer, kv: KVCacheManager, comm: Comm, vocab_start: int) -> None:
        super().__init__(model, kv)
        self.comm, self.vocab_start = comm, vocab_start
        self.vocab_rows = model.embed.weight.shape[0]


def make_runner(model: Transformer, kv: KVCacheManager, comm: Comm, vocab_start: int, *, cuda_graphs: bool,
                max_num_seqs: int, max_model_len: int, share_gpu: bool = False) -> ModelRunner:
    """The rank's runner: on CUDA, CudaModelRunner on the local shapes (its decode step, NCCL all-reduces
    included, captured in CUDA graphs; share_gpu: the same fused kernels run eagerly, gloo cannot be captured);
    else, or with cuda_graphs off, the generic runner."""
    if kv.device.type != "cuda" or not cuda_graphs:
        return TPModelRunner(model, kv, comm, vocab_start)
    from giants.inference.cuda_runner import CudaModelRunner

    class TPCudaModelRunner(TPHooks, CudaModelRunner):
        def __init__(self) -> None:
            self.comm, self.vocab_start = comm, vocab_start
            self.vocab_rows = model.embed.weight.shape[0]
            super().__init__(model, kv, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                             use_graphs=not share_gpu)
            # The batch-1 GEMV chain adds o_proj / down_proj into the residual inside its kernels, before any
            # all-reduce could run, and is picked by timing (ranks could pick differently): off under TP.
            self.chain_possible, self.chain = False, False

    return TPCudaModelRunner()


# ---- a step's chunks as one int64 message ------------------------------------------------------------
# [n_chunks, n_groups] then per chunk: start, n_tokens, sample, table length per group, tokens, tables.
# Tables are cut at the last block the chunk writes (what StepInputs reads); -1 = released (windows).

def encode_chunks(chunks: list[Chunk], block_size: int) -> bytes:
    n_groups = len(chunks[0].blocks.tables) if chunks else 0
    out: list[int] = [len(chunks), n_groups]
    for c in chunks:
        need = -(-(c.start + len(c.token_ids)) // block_size)
        tables = [t[:need] for t in c.blocks.tables]
        out += [c.start, len(c.token_ids), int(c.sample), *map(len, tables)]
        out += c.token_ids
        for t in tables:
            out += t
    return np.asarray(out, dtype=np.int64).tobytes()


def decode_chunks(buf: bytes) -> list[Chunk]:
    a = np.frombuffer(buf, dtype=np.int64).tolist()
    n, n_groups = a[0], a[1]
    i = 2
    chunks = []
    for _ in range(n):
        start, ntok, sample = a[i:i + 3]
        lens = a[i + 3:i + 3 + n_groups]
        i += 3 + n_groups
        tokens = a[i:i + ntok]
        i += ntok
        blocks = SeqBlocks(n_groups)
        for g, ln in enumerate(lens):
            blocks.tables[g] = a[i:i + ln]
            i += ln
        chunks.append(Chunk(blocks, start, tokens, bool(sample)))
    return chunks


def make_group(rank: int, world: int, port: int, device: torch.device, timeout_s: float, store=None,
               gloo: bool = False):
    """This rank's process group over a TCPStore on 127.0.0.1:port (rank 0 passes the store it hosts): gloo
    over loopback on the CPU (or when `gloo`), NCCL on GPUs. A private group object, not torch.distributed's
    global default, so a caller's own process group (or a second LLM) is left alone."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout)
    if device.type == "cuda" and not gloo:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    opts._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, world, opts)
