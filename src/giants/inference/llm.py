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
    quantization: "mxfp4" (MoE experts packed), "fp8" / "fp8-block" with "+head", "+mxfp4" (giants.inference.fp8); a
    checkpoint loads as it is stored when None (FP8 stays FP8, MXFP4 experts stay packed)."""
    from giants.inference.fp8 import is_fp8

    if quantization not in (None, "mxfp4") and not is_fp8(quantization):
        raise ValueError(f"quantization: one of 'mxfp4' (MoE experts), 'fp8', 'fp8-block' (+'+head' for the output "
                         f"head, +'+mxfp4' for MXFP4 experts) (got {quantization!r})")
    if isinstance(model, Transformer):
        if quantization == "mxfp4":
            from giants.inference.fp8 import check_experts
            from giants.inference.mxfp4 import pack_experts

            check_experts(quantization, model.config)
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

        _check_checkpoint_memory(model, dtype, device, quantization)
        # None: as stored (giants.checkpoint.quantized): FP8 weights and MXFP4 experts are never dequantized
        m = giants.load(model, dtype=dtype, device=str(device), quantization=quantization or "auto")
        tok = None
        try:
            tok = giants.load_tokenizer(model)
        except (ImportError, ValueError, FileNotFoundError, AttributeError):
            tok = None
        return m.eval(), tok
    if model in PRESETS:
        from giants.inference.preflight import check_memory

        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if quantization is None:  # before a byte is allocated (the quantized builds are smaller)
            check_memory(PRESETS[model].config, dtype, device, f"{model} (a preset: random weights)",
                         packed=device.type == "cpu" and dtype == torch.float32)
        if quantization == "mxfp4":
            from giants.inference.mxfp4 import build_mxfp4

            m = build_mxfp4(PRESETS[model].config, device, dtype, seed)
        elif is_fp8(quantization):
            from giants.inference.fp8 import build_fp8

            m = build_fp8(PRESETS[model].config, device, dtype, seed, quantization)
        else:
            m = random_model(model, device, dtype, seed)
        m.random_weights = True  # said wherever its text is printed or served (LLM.random_weights)
        return m, _default_tokenizer(m)
    from giants.inference.preflight import hub_id, real_weights_hint

    if hub_id(model) and not model.endswith(".gguf"):
        raise FileNotFoundError(f"model: {model} is not a local file or folder; it looks like a Hugging Face Hub id, "
                                f"and giants does not download from the Hub itself. {real_weights_hint(model)}")
    if model.endswith(".gguf") or os.sep in model:
        raise FileNotFoundError(f"model: {model} does not exist")
    from giants.presets import get_preset

    get_preset(model)  # raises the ValueError with close-name suggestions
    raise AssertionError("unreachable")


def _check_checkpoint_memory(source: str, dtype: torch.dtype | None, device: torch.device,
                             quantization: str | None) -> None:
    """The memory check for a checkpoint whose loaded size is known from its config alone: a GGUF file (dequantized
    to float32 unless `dtype`) or an unquantized Hugging Face folder (`dtype`, else its torch_dtype, else bf16)."""
    import json

    from giants.checkpoint import load_config
    from giants.checkpoint.hub import cached_path
    from giants.inference.preflight import check_memory

    path = cached_path(source) if source in _known_names() and not os.path.exists(source) else source
    if not os.path.exists(path) or quantization is not None:
        return  # a known name still to be downloaded: checked by the load itself
    gguf = str(path).endswith(".gguf")
    if not gguf:
        cfg_file = os.path.join(path, "config.json") if os.path.isdir(path) else None
        try:
            raw = json.loads(open(cfg_file).read()) if cfg_file and os.path.isfile(cfg_file) else {}
        except (OSError, ValueError):
            return
        if raw.get("quantization_config"):
            return  # stored quantized (FP8, MXFP4): loads as stored, smaller than its dtype says
        if dtype is None:
            dtype = parse_dtype(str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"))
    try:
        cfg = load_config(path)
    except Exception:  # noqa: BLE001 - an unreadable config is the load's to report
        return
    if gguf and cfg.is_moe:
        return  # MXFP4 experts stay packed (giants.load quantization="auto"): smaller than float32
    dtype = dtype or torch.float32
    check_memory(cfg, dtype, device, f"{source}", packed=device.type == "cpu" and dtype == torch.float32)


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
                 offload_folder: str | None = None, cpu_threads: int | str | None = None,
                 speculative_config: dict | None = None) -> None:
        """cpu_threads (giants' own, CPU): torch's intra-op thread count for the engine's steps; None/"auto" lets
        giants.inference.cpu_threads pick it by measuring (fewer threads when other processes hold the cores),
        unless OMP_NUM_THREADS is set.
        speculative_config: vLLM's dict, {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
        "prompt_lookup_min": 1} or {"model": DRAFT, "num_speculative_tokens": 4} (DRAFT: anything `model` takes;
        giants.inference.spec_decode)."""
        # None: the default (0.9; CUDA graphs where the device has them); a value given must take effect
        util_given, graphs_given = gpu_memory_utilization is not None, use_cuda_graphs is not None
        gpu_memory_utilization = 0.9 if gpu_memory_utilization is None else gpu_memory_utilization
        use_cuda_graphs = True if use_cuda_graphs is None else use_cuda_graphs
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1] (got {gpu_memory_utilization})")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        from giants.inference.preflight import check_device

        check_device(device)  # a CUDA device without CUDA: one line, not an allocator traceback
        if util_given and (device.type != "cuda" or num_blocks is not None):
            raise ValueError(f"gpu_memory_utilization: sizes the KV cache on a CUDA device when num_blocks is None; "
                             f"it would not be applied here (device {device.type!r}, num_blocks={num_blocks}) "
                             f"(got {gpu_memory_utilization})")
        if graphs_given and use_cuda_graphs and device.type != "cuda":
            raise ValueError(f"use_cuda_graphs: CUDA graphs need a CUDA device (got True with device {device.type!r})")
        torch.manual_seed(seed)
        self.executor = None  # tensor parallelism: the workers (giants.inference.executor); m is rank 0's shard
        if speculative_config is not None and tensor_parallel_size != 1:
            raise ValueError("speculative_config: not combined with tensor_parallel_size > 1 "
                             f"(got tensor_parallel_size={tensor_parallel_size})")
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
        # a preset built with random weights: its text is noise (giants generate / chat / serve say so)
        self.random_weights = bool(getattr(m, "random_weights", False))
        self.model_name = model if isinstance(model, str) else None
        self.engine = Engine(m, self.tokenizer, max_model_len=max_model_len, block_size=block_size,
                             num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens,
                             enable_prefix_caching=enable_prefix_caching, device=device, seed=seed,
                             gpu_memory_utilization=gpu_memory_utilization, use_cuda_graphs=use_cuda_graphs,
                             cpu_compile=cpu_compile, speculative_config=speculative_config,
                             make_runner=self.executor.make_runner if self.executor is not None else None)
        from giants.inference.cpu_threads import configure, parse_threads

        threads = parse_threads(cpu_threads)
        if threads is not None and (device.type != "cpu" or self.executor is not None):
            raise ValueError(f"cpu_threads: sets the CPU engine's threads; not for device {device.type!r} or "
                             f"tensor_parallel_size > 1 (got {cpu_threads!r})")
        self.thread_governor = configure(self.engine, threads) if self.executor is None else None
        self._ids = itertools.count()

    # ---- inputs --------------------------------------------------------------------
    def get_tokenizer(self) -> Any:
        """The tokenizer (vLLM's LLM.get_tokenizer); None when the model has none."""
        return self.tokenizer

    def stats(self) -> dict[str, Any]:
        """The engine's counters (Engine.stats): KV blocks, tokens, preemptions, prefix-cache hits and, with
        speculative_config, spec_acceptance_rate / spec_accepted_tokens_per_step / spec_tokens_per_step."""
        return self.engine.stats()

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            hint = ""
            if self.random_weights and self.model_name:
                from giants.inference.preflight import random_weights_note

                hint = " " + random_weights_note(self.model_name)
            raise ValueError("prompts: this model has no tokenizer; pass token id lists instead of text." + hint)
        ids = self.tokenizer.encode(prompt)
        return list(getattr(ids, "ids", ids))

    def _normalise(self, prompts: Any) -> list[tuple[str | None, list[int]]]:
        """A string, token ids, a vLLM prompt dict ({"prompt": text} or {"prompt_token_ids": ids}), or a list of
        those."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        elif isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
            raise ValueError("prompts: expected a string, a list of strings or a list of token id lists")
        out = []
        for p in prompts:
            if isinstance(p, dict):
                p = self._prompt_dict(p)
                if isinstance(p, tuple):
                    out.append(p)
                    continue
            if isinstance(p, str):
                out.append((p, self.encode(p)))
            elif isinstance(p, Sequence) and all(isinstance(t, int) for t in p):
                out.append((None, list(p)))
            else:
                raise ValueError(f"prompts: each prompt must be a string or a list of token ids (got {p!r:.60})")
        return out

    def _prompt_dict(self, p: dict) -> str | tuple[str | None, list[int]]:
        """vLLM's TextPrompt ({"prompt": str}) and TokensPrompt ({"prompt_token_ids": [int]}, an optional "prompt"
        kept as the text); any other key is refused by name rather than ignored."""
        extra = sorted(set(p) - {"prompt", "prompt_token_ids"})
        if extra:
            raise ValueError(f"prompts: {', '.join(map(repr, extra))} in a prompt dict is not supported (giants "
                             "reads 'prompt' and 'prompt_token_ids')")
        if "prompt_token_ids" in p:
            ids = p["prompt_token_ids"]
            if not isinstance(ids, Sequence) or isinstance(ids, str) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"prompts: 'prompt_token_ids' must be a list of ints (got {ids!r:.60})")
            text = p.get("prompt")
            return (text if isinstance(text, str) else None, list(ids))
        if isinstance(p.get("prompt"), str):
            return p["prompt"]
        raise ValueError(f"prompts: a prompt dict needs 'prompt' (a string) or 'prompt_token_ids' (got {p!r:.60})")

    # ---- generation ------------------------------------------------------------------
    def _check_params(self, sp: SamplingParams) -> SamplingParams:
        if sp.stop_strings and self.tokenizer is None:
            raise ValueError("SamplingParams.stop: stop strings are matched in the decoded text and this model has "
                             f"no tokenizer; use stop_token_ids (got {sp.stop!r})")
        return sp

    def generate(self, prompts: Any, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool | Any = True) -> list[RequestOutput]:
        """Runs every prompt to completion in one continuous batch; outputs in input order. A prompt
        that cannot run (too long, bad ids) gets an output with `error` set and finish_reason "error".
        use_tqdm: a progress bar over the prompts (True: tqdm on stderr when stdout is a terminal; a callable: used
        in place of tqdm.tqdm, as vLLM takes it; False: none)."""
        if not (isinstance(use_tqdm, bool) or callable(use_tqdm)):
            raise ValueError(f"use_tqdm: True, False or a tqdm-like callable (got {use_tqdm!r:.40})")
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
        bar = _progress(use_tqdm, len(order), len(results))
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
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

    def beam_search(self, prompts: Any, params: Any, use_tqdm: bool = False) -> list[Any]:
        """vLLM's LLM.beam_search: a BeamSearchOutput per prompt (giants.inference.beam_search)."""
        from giants.inference.beam_search import beam_search

        return beam_search(self, prompts, params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            chat_template: str | None = None, chat_template_kwargs: dict | None = None,
                            tools: list[dict] | None = None) -> str | list[int]:
        if self.tokenizer is None or not hasattr(self.tokenizer, "apply_chat_template"):
            raise ValueError("messages: this model has no tokenizer with a chat template")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise ValueError(f"chat_template_kwargs: a dict of template variables (got {chat_template_kwargs!r:.40})")
        kw = dict(chat_template_kwargs or {})
        if chat_template is not None:
            kw["chat_template"] = chat_template
        if tools is not None:
            kw["tools"] = tools
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool | Any = True,
             chat_template: str | None = None, chat_template_kwargs: dict | None = None,
             add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of conversations. chat_template_kwargs:
        extra variables for the template (e.g. {"enable_thinking": False}), as vLLM's LLM.chat takes them."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]  # type: ignore[list-item]
        prompts = []
        for conv in messages:
            if not isinstance(conv, list) or not all(isinstance(m, dict) and "role" in m for m in conv):
                raise ValueError("messages: expected a list of {'role': ..., 'content': ...} dicts")
            rendered = self.apply_chat_template(conv, add_generation_prompt, chat_template,  # type: ignore[arg-type]
                                                chat_template_kwargs, tools)
            prompts.append(list(rendered) if not isinstance(rendered, str) else rendered)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _progress(use_tqdm: bool | Any, total: int, done: int) -> Any:
    """A tqdm bar over `total` prompts (None when off, or when True but stdout is not a terminal)."""
    import sys

    if use_tqdm is False or total <= 1 and use_tqdm is True:
        return None
    if use_tqdm is True:
        if not sys.stdout.isatty():
            return None
        try:
            from tqdm import tqdm as use_tqdm
        except ImportError:
            return None
    bar = use_tqdm(total=total, desc="Processed prompts", unit="prompt", dynamic_ncols=True)
    if done:
        bar.update(done)
    return bar


def _failed(rid: str, ids: list[int], text: str | None, sp: SamplingParams, error: str) -> RequestOutput:
    comps = [CompletionOutput(index=i, text="", token_ids=[], finish_reason="error") for i in range(sp.n)]
    return RequestOutput(rid, ids, comps, True, RequestMetrics(0.0, num_prompt_tokens=len(ids)), text, error=error)
