"""`LLM`: vLLM's offline API over the engine (generate, chat, stream)."""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from giants.inference.engine import Engine
from giants.inference.outputs import CompletionOutput, RequestMetrics, RequestOutput
from giants.inference.params import SamplingParams
from giants.model.transformer import Transformer, build
from giants.presets import PRESETS

SMOLLM2_VOCAB = 49152

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype: unknown dtype {dtype!r} (one of {', '.join(_DTYPES)})") from None


def _known_names() -> set[str]:
    """Names the checkpoint area can fetch real weights for."""
    try:
        import giants.checkpoint as ckpt
    except ImportError:
        return set()
    for attr in ("KNOWN_MODELS", "KNOWN"):
        known = getattr(ckpt, attr, None)
        if known:
            return set(known)
    return set()


def random_model(name: str, device: torch.device, dtype: torch.dtype, seed: int) -> Transformer:
    """A preset with random weights, built straight on the target device (never a full fp32 copy)."""
    cfg = PRESETS[name].config
    # cast on meta first: materializing fp32 and converting after would need twice the memory
    model = build(cfg, device="meta").to(dtype).materialize(device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(generator=gen)
    return model.eval()


def resolve_model(model: str | Transformer, dtype: torch.dtype | None, device: torch.device,
                  seed: int, quantization: str | None = None) -> tuple[Transformer, Any]:
    """(model, tokenizer or None) for a Transformer, a path (HF dir / .gguf), a known name or a preset.
    quantization: "mxfp4" (MoE experts packed), "fp8" / "fp8-block" with "+head" (giants.inference.fp8); a
    checkpoint loads as it is stored when None (FP8 stays FP8, MXFP4 experts stay packed)."""
    from giants.inference.fp8 import is_fp8

    if quantization not in (None, "mxfp4") and not is_fp8(quantization):
        raise ValueError(f"quantization: one of 'mxfp4' (MoE experts), 'fp8', 'fp8-block' (+'+head' for the output "
                         f"head) (got {quantization!r})")
    if isinstance(model, Transformer):
        if quantization == "mxfp4":
            from giants.inference.mxfp4 import pack_experts

            if not model.config.is_moe:
                raise ValueError("quantization: 'mxfp4' quantizes mixture-of-experts layers, and this model has none "
                                 f"(n_experts={model.config.n_experts}) (got {quantization!r})")

            model = pack_experts(model)
        if dtype is not None or next(model.parameters()).device != device:
            model = model.to(device=device, dtype=dtype)
        if is_fp8(quantization):
            from giants.inference.fp8 import quantize_model

            model = quantize_model(model, quantization)
        return model.eval(), None
    if not isinstance(model, str):
        raise ValueError(f"model: expected a preset name, path or Transformer (got {type(model).__name__})")
    if os.path.exists(model) or model in _known_names():
        import giants

        # None: as stored (giants.checkpoint.quantized): FP8 weights and MXFP4 experts are never dequantized
        m = giants.load(model, dtype=dtype, device=str(device), quantization=quantization or "auto")
        tok = None
        try:
            tok = giants.load_tokenizer(model)
        except (ImportError, ValueError, FileNotFoundError, AttributeError):
            tok = None
        return m.eval(), tok
    if model in PRESETS:
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if quantization == "mxfp4":
            from giants.inference.mxfp4 import build_mxfp4

            m = build_mxfp4(PRESETS[model].config, device, dtype, seed)
        elif is_fp8(quantization):
            from giants.inference.fp8 import build_fp8

            m = build_fp8(PRESETS[model].config, device, dtype, seed, quantization)
        else:
            m = random_model(model, device, dtype, seed)
        return m, _default_tokenizer(m)
    if model.endswith(".gguf") or os.sep in model:
        raise FileNotFoundError(f"model: {model} does not exist")
    from giants.presets import get_preset

    get_preset(model)  # raises the ValueError with close-name suggestions
    raise AssertionError("unreachable")


def _default_tokenizer(model: Transformer) -> Any:
    """Tiny twins and SmolLM2-shaped presets share SmolLM2's vocabulary: use its tokenizer when cached."""
    if model.config.vocab_size != SMOLLM2_VOCAB:
        return None
    return _smollm2_tokenizer()


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer() -> Any:
    try:
        import giants

        return giants.load_tokenizer("smollm2-135m")
    except Exception:  # noqa: BLE001 - no tokenizer available offline: token ids still work
        return None


class LLM:
    def __init__(self, model: str | Transformer, tokenizer: Any = None, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1, seed: int = 0,
                 block_size: int = 16, num_blocks: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 use_cuda_graphs: bool | None = None, quantization: str | None = None, weights: str | None = None,
                 cpu_compile: bool = False, device_map: str | dict | None = None, max_memory: dict | None = None,
                 offload_folder: str | None = None) -> None:
        # None: the default (0.9; CUDA graphs where the device has them); a value given must take effect
        util_given, graphs_given = gpu_memory_utilization is not None, use_cuda_graphs is not None
        gpu_memory_utilization = 0.9 if gpu_memory_utilization is None else gpu_memory_utilization
        use_cuda_graphs = True if use_cuda_graphs is None else use_cuda_graphs
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1] (got {gpu_memory_utilization})")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if util_given and (device.type != "cuda" or num_blocks is not None):
            raise ValueError(f"gpu_memory_utilization: sizes the KV cache on a CUDA device when num_blocks is None; "
                             f"it would not be applied here (device {device.type!r}, num_blocks={num_blocks}) "
                             f"(got {gpu_memory_utilization})")
        if graphs_given and use_cuda_graphs and device.type != "cuda":
            raise ValueError(f"use_cuda_graphs: CUDA graphs need a CUDA device (got True with device {device.type!r})")
        torch.manual_seed(seed)
        self.executor = None  # tensor parallelism: the workers (giants.inference.executor); m is rank 0's shard
        if device_map is not None and tensor_parallel_size != 1:
            raise ValueError("device_map: not combined with tensor_parallel_size (place whole blocks or split them)")
        if tensor_parallel_size != 1:
            from giants.inference import executor

            self.executor, tok = executor.start(model, tensor_parallel_size, dtype=parse_dtype(dtype), device=device,
                                                seed=seed, quantization=quantization, weights=weights,
                                                cpu_compile=cpu_compile)
            m = self.executor.model
        elif device_map is not None:  # layer placement: blocks on GPUs / host memory / disk (placement.py)
            from giants.inference.placement import resolve_placed_model

            m, tok, device, use_cuda_graphs = resolve_placed_model(
                model, parse_dtype(dtype), device, seed, device_map, max_memory, offload_folder,
                quantization=quantization, weights=weights, util=gpu_memory_utilization,
                use_cuda_graphs=use_cuda_graphs)
        else:
            m, tok = resolve_model(model, parse_dtype(dtype), device, seed, quantization)
        if weights not in (None, "int8"):
            raise ValueError(f"weights: only 'int8' (weight-only, CPU) is supported (got {weights!r})")
        if weights == "int8" and isinstance(quantization, str) and quantization.startswith("fp8"):
            raise ValueError(f"weights: 'int8' is not combined with quantization={quantization!r}")
        if weights == "int8" and self.executor is None:
            from giants.inference.quant import int8_weights

            m = int8_weights(m)
        self.model = m
        self.tokenizer = tokenizer if tokenizer is not None else tok
        self.engine = Engine(m, self.tokenizer, max_model_len=max_model_len, block_size=block_size,
                             num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens,
                             enable_prefix_caching=enable_prefix_caching, device=device, seed=seed,
                             gpu_memory_utilization=gpu_memory_utilization, use_cuda_graphs=use_cuda_graphs,
                             cpu_compile=cpu_compile,
                             make_runner=self.executor.make_runner if self.executor is not None else None)
        self._ids = itertools.count()

    # ---- inputs --------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompts: this model has no tokenizer; pass token id lists instead of text")
        ids = self.tokenizer.encode(prompt)
        return list(getattr(ids, "ids", ids))

    def _normalise(self, prompts: Any) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
            raise ValueError("prompts: expected a string, a list of strings or a list of token id lists")
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append((p, self.encode(p)))
            elif isinstance(p, Sequence) and all(isinstance(t, int) for t in p):
                out.append((None, list(p)))
            else:
                raise ValueError(f"prompts: each prompt must be a string or a list of token ids (got {p!r:.60})")
        return out

    # ---- generation ------------------------------------------------------------------
    def _check_params(self, sp: SamplingParams) -> SamplingParams:
        if sp.stop_strings and self.tokenizer is None:
            raise ValueError("SamplingParams.stop: stop strings are matched in the decoded text and this model has "
                             f"no tokenizer; use stop_token_ids (got {sp.stop!r})")
        return sp

    def generate(self, prompts: Any, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Runs every prompt to completion in one continuous batch; outputs in input order. A prompt
        that cannot run (too long, bad ids) gets an output with `error` set and finish_reason "error"."""
        items = self._normalise(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(items):
                raise ValueError(f"sampling_params: {len(sampling_params)} given for {len(items)} prompts")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(items)
        for sp in params:
            self._check_params(sp)
        results: dict[str, RequestOutput] = {}
        order = []
        for (text, ids), sp in zip(items, params):
            rid = str(next(self._ids))
            order.append(rid)
            try:
                self.engine.add_request(rid, ids, sp, prompt=text)
            except ValueError as e:
                results[rid] = _failed(rid, ids, text, sp, str(e))
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
        return [results[r] for r in order]

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None
               ) -> Iterator[RequestOutput]:
        """Yields a RequestOutput each step this prompt progresses (new_text / new_token_ids are the deltas)."""
        (text, ids), = self._normalise([prompt])
        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(rid, ids, self._check_params(sampling_params or SamplingParams()), prompt=text)
        try:
            done = False
            while not done and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            self.engine.abort_request(rid)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | list[int]:
        if self.tokenizer is None or not hasattr(self.tokenizer, "apply_chat_template"):
            raise ValueError("messages: this model has no tokenizer with a chat template")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of conversations."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]  # type: ignore[list-item]
        prompts = []
        for conv in messages:
            if not isinstance(conv, list) or not all(isinstance(m, dict) and "role" in m for m in conv):
                raise ValueError("messages: expected a list of {'role': ..., 'content': ...} dicts")
            rendered = self.apply_chat_template(conv)  # type: ignore[arg-type]
            prompts.append(list(rendered) if not isinstance(rendered, str) else rendered)
        return self.generate(prompts, sampling_params)


def _failed(rid: str, ids: list[int], text: str | None, sp: SamplingParams, error: str) -> RequestOutput:
    comps = [CompletionOutput(index=i, text="", token_ids=[], finish_reason="error") for i in range(sp.n)]
    return RequestOutput(rid, ids, comps, True, RequestMetrics(0.0, num_prompt_tokens=len(ids)), text, error=error)
