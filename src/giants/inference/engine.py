"""The engine: requests in, a continuous batch over a paged KV cache, outputs out, one step at a time.

Each `step()` schedules work under a token budget: running sequences first (one token each when
decoding, a chunk when a prompt is still being prefilled), then waiting sequences while blocks, the
budget and `max_num_seqs` allow (prefix-cache hits skip the matching prompt blocks). When a running
sequence needs a block and none is free, the most recently admitted sequence is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed from its tokens later (the
prefix cache usually gives most of them back). Requests join and leave between steps.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from giants.inference import logits_process as knobs
from giants.inference.detokenize import IncrementalText
from giants.inference.guided import Guide, new_guide
from giants.inference.kv_cache import KVCacheManager, SeqBlocks
from giants.inference.outputs import CompletionOutput, RequestMetrics, RequestOutput
from giants.inference.params import SamplingParams
from giants.inference.runner import Chunk, ModelRunner
from giants.inference.sampling import Sampler, SamplingRow
from giants.inference.spec_decode import SpecDecoder
from giants.model.transformer import Transformer

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
DEFAULT_MAX_MODEL_LEN = 1 << 20  # the longest default max_model_len, whatever the checkpoint claims


@dataclass
class _Ahead:
    """A decode step queued before the previous step's tokens were read: for these sequences at these
    positions, its logits coming."""

    seqs: list[Sequence]
    starts: list[int]
    logits: torch.Tensor

    def matches(self, scheduled: list[tuple[Sequence, int]]) -> bool:
        return len(scheduled) == len(self.seqs) and all(
            seq is s and n == 1 and seq.num_computed == start
            for (seq, n), s, start in zip(scheduled, self.seqs, self.starts))


class Sequence:
    def __init__(self, seq_id: int, request: Request, index: int, n_groups: int, generator: torch.Generator | None,
                 tokenizer: Any) -> None:
        self.seq_id, self.request, self.index = seq_id, request, index
        self.prompt_ids = request.prompt_token_ids
        self.output_ids: list[int] = []
        self.num_computed = 0
        self.status = WAITING
        self.blocks = SeqBlocks(n_groups)
        self.generator = generator
        p = request.params
        self.text = IncrementalText(tokenizer, self.prompt_ids, p.stop_matcher or [], p.skip_special_tokens)
        self.logprobs: list[dict[int, float]] | None = [] if p.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if p.logprobs is not None or knobs.wants_cumulative(p) else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.reported_tokens = 0
        self.finish_reported = False
        self.admitted_once = False
        self.guide: Guide | None = None  # structured output's grammar state; kept through preemption

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list (decode steps read one token)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.token_ids[start:end]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    prompt: str | None = None
    seqs: list[Sequence] | None = None

    num_unfinished: int = 0
    error: str | None = None  # set when this request failed on its own inside a step (its sequences "error")
    group: str | None = None  # fair admission shares the batch between groups (default: each request its own)
    prompt_logprobs: list[dict[int, float] | None] | None = None  # SamplingParams.prompt_logprobs

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0


def _eos_ids(model: Transformer, tokenizer: Any) -> set[int]:
    eos = model.config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tok_eos, int):
        ids.add(tok_eos)
    # every end token the checkpoint names (generation_config.json's list, as vLLM stops at them): gpt-oss's
    # config names only <|return|>, its generation config <|call|> too
    ids.update(i for i in getattr(tokenizer, "eos_token_ids", ()) or () if isinstance(i, int))
    return ids


class Engine:
    def __init__(self, model: Transformer, tokenizer: Any = None, *, max_model_len: int | None = None,
                 block_size: int = 16, num_blocks: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 device: torch.device | str | None = None, seed: int = 0, gpu_memory_utilization: float = 0.9,
                 use_cuda_graphs: bool = True, cpu_onednn: bool | None = None,
                 async_decode: bool | None = None, cpu_compile: bool = False,
                 make_runner: Callable[[Engine], Any] | None = None, speculative_config: Any = None) -> None:
        """make_runner(engine): builds the runner once the KV cache exists, in place of the one-process
        runners (tensor parallelism: the executor's driver; `model` is then rank 0's shard).
        speculative_config: vLLM's dict ({"method": "ngram", ...} or {"model": DRAFT, ...}; spec_decode)."""
        cfg = model.config
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        if p.device != self.device:
            model = model.to(self.device)
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, cfg
        self.max_model_len = int(max_model_len or cfg.max_context)
        if not 1 <= self.max_model_len <= cfg.max_context:
            raise ValueError(f"max_model_len: must be in [1, max_context={cfg.max_context}] (got {max_model_len})")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1 (got {max_num_seqs})")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = int(max_num_batched_tokens or 2048)
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1 (got {max_num_batched_tokens})")
        self.block_size = block_size
        dtype = p.dtype
        # speculative decoding: the draft model is resolved before the KV cache, whose budget it shares
        self.spec = SpecDecoder(speculative_config, model, seed) if speculative_config is not None else None
        if self.spec is not None and make_runner is not None:
            raise ValueError("speculative_config: not supported with tensor parallelism")
        if max_model_len is None:  # the checkpoint's context length alone never sizes the cache (issue 26)
            self.max_model_len = self._default_max_model_len(dtype, gpu_memory_utilization)
        if num_blocks is None:
            num_blocks = self._auto_num_blocks(block_size, dtype, gpu_memory_utilization)
        self.kv = KVCacheManager(cfg, block_size=block_size, num_blocks=num_blocks, max_model_len=self.max_model_len,
                                 dtype=dtype, device=self.device, enable_prefix_caching=enable_prefix_caching)
        self.use_cuda_graphs = use_cuda_graphs
        self.runner = make_runner(self) if make_runner is not None else self._make_runner(use_cuda_graphs)
        if self.spec is not None:
            self.spec.attach(self)
        # Launch the next decode step before reading this step's tokens back (its input ids stay on the
        # device), so the host's bookkeeping overlaps the GPU's work: on by default where decode replays
        # CUDA graphs; elsewhere it only costs a read-back, but the CPU tests force it to check the logic.
        self.async_decode = bool(getattr(self.runner, "use_graphs", False)) if async_decode is None \
            else bool(async_decode)
        self._ahead: _Ahead | None = None
        self.num_ahead_used = self.num_ahead_dropped = 0
        if cpu_compile:
            if self.device.type != "cpu":
                raise ValueError(f"cpu_compile: only for device 'cpu' (got {self.device.type!r})")
            self.runner.compile_decode()
        if cpu_onednn is None:  # the compiled decode streams the plain weights: no second, packed copy
            cpu_onednn = self.device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available() \
                and not cpu_compile
        if cpu_onednn:
            self.runner.pack_for_onednn()
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.sampler = Sampler(self.generator)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.sampler.eos_ids = frozenset(self.eos_ids)  # min_tokens holds them back
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._seq_ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_preemptions = 0
        self.num_steps = 0
        self._finished_outside: list[Request] = []
        # host seconds per phase of step(), summed (the GPU wait shows up in sample_and_wait)
        self.timing = {"schedule": 0.0, "launch": 0.0, "sample_and_wait": 0.0, "outputs": 0.0}

    # ---- setup -------------------------------------------------------------------
    def _auto_num_blocks(self, block_size: int, dtype: torch.dtype, util: float) -> list[int]:
        cfg = self.cfg
        windows = sorted({w if w and w < self.max_model_len else 0 for w in cfg.windows})
        layers = {w: sum(1 for x in cfg.windows if (x if x and x < self.max_model_len else 0) == w) for w in windows}
        per_seq = {w: (-(-self.max_model_len // block_size) if not w else
                       min(-(-(w + self.max_num_batched_tokens) // block_size) + 1,
                           -(-self.max_model_len // block_size))) for w in windows}
        per_block = {w: KVCacheManager.bytes_per_block(cfg, block_size, layers[w], dtype) for w in windows}
        budget = self._kv_budget(util)
        # Enough for every sequence at full length if that fits, else as many as the budget allows.
        full = sum(per_seq[w] * per_block[w] for w in windows) * self.max_num_seqs
        scale = min(1.0, max(budget, 0) / full)
        counts = [max(per_seq[w], int(per_seq[w] * self.max_num_seqs * scale)) for w in windows]
        return counts

    def _kv_budget(self, util: float) -> int:
        """Bytes the KV cache may take: the GPU's share left after the model and activations, else 1 GiB."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            logits = 4 * self.max_num_batched_tokens * self.cfg.vocab_size
            return int((int(total * util) - (total - free) - (1 << 30) - logits) * self._kv_share())
        return int((1 << 30) * self._kv_share())

    def _kv_share(self) -> float:
        """The target's share of the KV budget (a draft model's cache takes the rest: spec_decode)."""
        spec = getattr(self, "spec", None)
        return spec.kv_share(self.model) if spec is not None else 1.0

    def _default_max_model_len(self, dtype: torch.dtype, util: float) -> int:
        """max_model_len when none is given: the checkpoint's context length (GGUF context_length, HF
        max_position_embeddings), but at most what one sequence's full-attention KV fits in the cache budget (no
        less than 2048 tokens) and 2**20 tokens, so a file claiming 4e9 positions cannot size the cache, its block
        tables or the CUDA graphs' buffers. A larger max_model_len can still be asked for explicitly."""
        full = sum(1 for w in self.cfg.windows if not w)
        per_token = KVCacheManager.bytes_per_block(self.cfg, 1, full, dtype)
        fit = max(self._kv_budget(util), 0) // per_token if per_token else DEFAULT_MAX_MODEL_LEN
        return max(1, min(self.cfg.max_context, DEFAULT_MAX_MODEL_LEN, max(fit, 2048)))

    def _make_runner(self, use_cuda_graphs: bool):
        if self.device.type == "cuda" and use_cuda_graphs:
            from giants.inference.cuda_runner import CudaModelRunner

            return CudaModelRunner(self.model, self.kv, max_num_seqs=self.max_num_seqs,
                                   max_model_len=self.max_model_len)
        return ModelRunner(self.model, self.kv)

    # ---- requests ----------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    prompt: str | None = None, arrival_time: float | None = None, group: str | None = None) -> None:
        """group: requests that share one (the prompts of one HTTP request) share one turn of fair admission."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: must be a SamplingParams (got {type(params).__name__})")
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError("prompt_token_ids: the prompt is empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.cfg.vocab_size for t in ids):
            bad = next(t for t in ids if not (isinstance(t, int) and 0 <= t < self.cfg.vocab_size))
            raise ValueError(f"prompt_token_ids: token id {bad!r} outside [0, vocab_size={self.cfg.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt_token_ids: the prompt has {len(ids)} tokens; max_model_len={self.max_model_len} "
                             "leaves no room to generate")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer (this engine has none)")
        if not self.kv.fits_at_all(len(ids) + 1, self.max_num_batched_tokens):
            raise ValueError(f"prompt_token_ids: {len(ids)} tokens do not fit in the KV cache "
                             f"({self.kv.num_blocks_total} blocks of {self.block_size})")
        knobs.prepare(params, self.cfg.vocab_size, self.tokenizer)
        plp = knobs.engine_prompt_logprobs(self, ids, params.prompt_logprobs) \
            if params.prompt_logprobs is not None else None
        now = time.perf_counter() if arrival_time is None else arrival_time
        req = Request(request_id, ids, params, RequestMetrics(now, num_prompt_tokens=len(ids)), prompt,
                      group=request_id if group is None else group, prompt_logprobs=plp)
        req.seqs = []
        n_seqs = params.best_of or params.n  # best_of > n: the n best are returned when all have finished
        req.num_unfinished = n_seqs
        for i in range(n_seqs):
            gen = None
            if params.seed is not None:
                s = params.seed if i == 0 else hash((params.seed, i)) & ((1 << 63) - 1)
                gen = torch.Generator(device=self.device).manual_seed(s)
            seq = Sequence(next(self._seq_ids), req, i, len(self.kv.groups), gen, self.tokenizer)
            seq.guide = new_guide(params, self.tokenizer, self.cfg.vocab_size, self.eos_ids)
            req.seqs.append(seq)
            self.waiting.append(seq)
        self.requests[request_id] = req

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if seq.status != FINISHED:
                self._finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict[str, Any]:
        total, free = self.kv.num_blocks_total, self.kv.num_blocks_free
        return {
            "num_running": len(self.running), "num_waiting": len(self.waiting),
            "num_requests": len(self.requests),
            "kv_blocks_used": total - free, "kv_blocks_free": free, "kv_blocks_total": total,
            "kv_block_size": self.block_size,
            "prompt_tokens_total": self.prompt_tokens_total, "generation_tokens_total": self.generation_tokens_total,
            "num_preemptions": self.num_preemptions, "num_steps": self.num_steps,
            "prefix_cache_queries": self.kv.prefix_queries, "prefix_cache_hits": self.kv.prefix_hits,
            **(self.spec.stats() if self.spec is not None else {}),
        }

    # ---- scheduling --------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        seq.status = FINISHED
        seq.request.num_unfinished -= 1
        self.kv.free(seq.blocks)
        if seq.request.finished:
            seq.request.metrics.finished_time = time.perf_counter()

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.blocks)
        seq.num_computed = 0
        seq.status = WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        seq.request.metrics.num_preemptions += 1

    def _schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != RUNNING:
                continue  # preempted below while making room for an earlier sequence
            n = min(len(seq) - seq.num_computed, budget)
            self.kv.release_outside_window(seq.blocks, seq.num_computed)
            while not self.kv.allocate(seq.blocks, seq.num_computed, seq.num_computed + n):
                victim = self.running[-1]
                preempted = True
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status == RUNNING:
                scheduled.append((seq, n))
                budget -= n
        order = None
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            if order is None:
                order = self._admission_order()
            seq = next(order)
            if seq.num_computed == 0:
                seq.num_computed = self.kv.match_prefix(seq.blocks, seq.token_ids)
                if not seq.admitted_once:
                    seq.request.metrics.num_cached_tokens = max(seq.request.metrics.num_cached_tokens,
                                                                seq.num_computed)
            n = min(len(seq) - seq.num_computed, budget)
            if not self.kv.allocate(seq.blocks, seq.num_computed, seq.num_computed + n):
                if not self.running:
                    # Nothing left to preempt: the sequence alone outgrew the cache.
                    self._finish(seq, "length")
                    self._finished_outside.append(seq.request)
                    continue
                self.kv.free(seq.blocks)
                seq.num_computed = 0
                break
            self.waiting.remove(seq)
            seq.status = RUNNING
            self.running.append(seq)
            if not seq.admitted_once:
                seq.admitted_once = True
                self.prompt_tokens_total += len(seq.prompt_ids)
                m = seq.request.metrics
                m.first_scheduled_time = m.first_scheduled_time or time.perf_counter()
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def _admission_order(self):
        """Waiting sequences in the order they may join the batch: preempted ones first (they were running),
        then one sequence of each group in turn, the groups with the fewest running sequences first (ties: by
        arrival), so a small request is admitted at the next free slot rather than behind every sequence of a
        large one (n=128, many prompts). With one sequence per request this is arrival order."""
        running: dict[str, int] = {}
        for seq in self.running:
            running[seq.request.group] = running.get(seq.request.group, 0) + 1
        groups: dict[str, deque[Sequence]] = {}
        for seq in list(self.waiting):  # a snapshot: the caller removes what it admits
            if seq.admitted_once:
                if seq.status == WAITING:
                    yield seq
            else:
                groups.setdefault(seq.request.group, deque()).append(seq)
        heap = [(running.get(g, 0), i, g) for i, g in enumerate(groups)]
        heapq.heapify(heap)
        while heap:
            count, i, g = heapq.heappop(heap)
            queue = groups[g]
            seq = queue.popleft()
            if seq.status == WAITING:
                yield seq
                count += 1
            if queue:
                heapq.heappush(heap, (count, i, g))

    # ---- the step ----------------------------------------------------------------
    def _launch_ahead(self, scheduled: list[tuple[Sequence, int]], chunks: list[Chunk],
                      tokens: torch.Tensor) -> _Ahead | None:
        """Queues the next decode step of these sequences, fed by the tokens still on the device, if the
        next schedule will surely be the same batch again: every sequence decoding one token, nothing
        waiting to join, no length limit reached, and the next token's KV slot allocated now."""
        if not (self.async_decode and getattr(self.runner, "supports_ahead", False)) or self.waiting \
                or self.spec is not None:  # the next step's chunks may carry drafts
            return None
        if len(scheduled) != len(self.running) or any(n != 1 or not c.sample for (_, n), c in zip(scheduled, chunks)):
            return None
        seqs = [seq for seq, _ in scheduled]
        for seq in seqs:
            p = seq.request.params
            if (p.max_tokens is not None and len(seq.output_ids) + 1 >= p.max_tokens) \
                    or len(seq) + 1 >= self.max_model_len or p.logprobs is not None:
                return None
        for seq in seqs:
            # num_computed already counts this step's token: the next one goes to that position
            self.kv.release_outside_window(seq.blocks, seq.num_computed)
            if not self.kv.allocate(seq.blocks, seq.num_computed, seq.num_computed + 1):
                return None  # out of blocks: the next step's scheduler preempts as usual
        nxt = [Chunk(seq.blocks, seq.num_computed, [0], True) for seq in seqs]
        if not self.runner.can_run_ahead(nxt):
            return None
        logits = self.runner.execute(nxt, ids=tokens)
        return _Ahead(seqs, [seq.num_computed for seq in seqs], logits)

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        scheduled = self._schedule()
        touched: dict[str, Request] = {}
        if scheduled:
            chunks = [Chunk(seq.blocks, seq.num_computed, seq.tokens(seq.num_computed, seq.num_computed + n),
                            seq.num_computed + n == len(seq)) for seq, n in scheduled]
            if self.spec is not None:  # drafts join the decode chunks, verified by this step's forward
                self.spec.plan(scheduled, chunks)
            t1 = time.perf_counter()
            ahead, self._ahead = self._ahead, None
            if ahead is not None and ahead.matches(scheduled):
                logits = ahead.logits  # already queued by the previous step
                self.num_ahead_used += 1
            else:
                if ahead is not None:
                    # the batch changed (a sequence finished, was aborted or preempted): its result is
                    # dropped; the KV it wrote sits at positions nobody has computed yet, rewritten when they are
                    self.num_ahead_dropped += 1
                logits = self.runner.execute(chunks)
            t2 = time.perf_counter()
            self.timing["schedule"] += t1 - t0
            self.timing["launch"] += t2 - t1
            sampling = [seq for (seq, n), c in zip(scheduled, chunks) if c.sample]
            for seq, n in scheduled:
                seq.num_computed += n
            if sampling:
                rows = [SamplingRow(s.request.params, s.prompt_ids, s.output_ids, s.generator, s.guide)
                        for s in sampling]
                if self.spec is not None and self.spec.drafted:  # several tokens per sequence (spec_decode)
                    picked = self.spec.sample(logits, sampling, rows)
                else:
                    try:
                        pending = self.sampler.launch(logits, rows)
                        if not pending.wants_logprobs:
                            pending.copy_async()
                            self._ahead = self._launch_ahead(scheduled, chunks, pending.tokens)
                        result = pending.result()
                        picked = list(zip(sampling, result.tokens, result.logprobs))
                    except Exception:  # noqa: BLE001 - some row's sampling failed: find it, fail its request alone
                        self._ahead = None
                        picked = self._sample_rows_alone(logits, sampling, rows)
                now = time.perf_counter()
                self.timing["sample_and_wait"] += now - t2
                for seq, tok, lp in picked:
                    if seq.status != RUNNING:
                        continue  # its request failed with a sibling's row
                    try:
                        self._append_token(seq, tok, lp, now)
                    except Exception as e:  # noqa: BLE001 - e.g. its stop strings or detokenization
                        self._fail_request(seq.request, e)
            bs = self.block_size
            for seq, _ in scheduled:
                if seq.status == RUNNING and seq.num_computed // bs > seq.blocks.registered:
                    self.kv.register_full_blocks(seq.blocks, seq.token_ids, seq.num_computed)
                touched[seq.request.request_id] = seq.request
        # Requests finished outside a step (too long for the cache) still report once.
        for req in self._finished_outside:
            touched[req.request_id] = req
        self._finished_outside.clear()
        self.num_steps += 1
        t3 = time.perf_counter()
        outputs = []
        for req in touched.values():
            out = self._output(req)
            if out is not None:
                outputs.append(out)
            if req.finished:
                self.requests.pop(req.request_id, None)
        self.timing["outputs"] += time.perf_counter() - t3
        return outputs

    def _sample_rows_alone(self, logits: torch.Tensor, sampling: list[Sequence],
                           rows: list[SamplingRow]) -> list[tuple[Sequence, int, dict[int, float] | None]]:
        """The batch's sampling raised: sample each row on its own; a row that fails again fails its request
        (finish_reason "error", RequestOutput.error set) and the rest of the batch goes on."""
        picked = []
        for i, (seq, row) in enumerate(zip(sampling, rows)):
            if seq.status != RUNNING:
                continue
            try:
                res = self.sampler.launch(logits[i:i + 1], [row]).result()
            except Exception as e:  # noqa: BLE001
                self._fail_request(seq.request, e)
                continue
            picked.append((seq, res.tokens[0], res.logprobs[0]))
        return picked

    def _fail_request(self, req: Request, e: BaseException) -> None:
        req.error = req.error or f"{type(e).__name__}: {e}"
        for seq in req.seqs:
            if seq.status != FINISHED:
                self._finish(seq, "error")
        self._finished_outside.append(req)

    def _append_token(self, seq: Sequence, tok: int, lp: dict[int, float] | None, now: float) -> None:
        params = seq.request.params
        if seq.guide is not None:
            seq.guide.accept(tok)
        seq.output_ids.append(tok)
        self.generation_tokens_total += 1
        m = seq.request.metrics
        m.num_generated_tokens += 1
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        if seq.logprobs is not None:
            seq.logprobs.append(lp)
        if seq.cumulative_logprob is not None and lp is not None:
            seq.cumulative_logprob += lp[tok]
        if tok in params.stop_token_ids or (tok in self.eos_ids and not params.ignore_eos):
            self._finish(seq, "stop", tok)
            return
        stop = seq.text.add(tok, match=len(seq.output_ids) > params.min_tokens)
        if stop is not None:
            self._finish(seq, "stop", stop)
        elif seq.guide is not None and seq.guide.done:  # the grammar is complete and allows nothing more
            self._finish(seq, "stop")
        elif params.max_tokens is not None and len(seq.output_ids) >= params.max_tokens:
            self._finish(seq, "length")
        elif len(seq) >= self.max_model_len:
            self._finish(seq, "length")

    def _output(self, req: Request) -> RequestOutput | None:
        comps = []
        progressed = False
        seqs = req.seqs
        if knobs.wants_cumulative(req.params):  # best_of > n: nothing until every candidate is done
            if not req.finished:
                return None
            seqs = knobs.best_of_order(seqs, req.params.n)
        for k, seq in enumerate(seqs):
            new_ids = seq.output_ids[seq.reported_tokens:]
            done = seq.status == FINISHED
            new_text = seq.text.take_new(done)
            if new_ids or new_text or (done and not seq.finish_reported):
                progressed = True
            seq.reported_tokens = len(seq.output_ids)
            seq.finish_reported = done
            comps.append(CompletionOutput(
                index=k if seqs is not req.seqs else seq.index, text=seq.text.text[:seq.text.emitted],
                token_ids=list(seq.output_ids),
                finish_reason=seq.finish_reason, logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                new_token_ids=new_ids, new_text=new_text, stop_reason=seq.stop_reason,
                cumulative_logprob=seq.cumulative_logprob))
        if not progressed:
            return None
        return RequestOutput(req.request_id, req.prompt_token_ids, comps, req.finished, req.metrics, req.prompt,
                             error=req.error, prompt_logprobs=req.prompt_logprobs)
