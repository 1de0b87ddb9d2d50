"""`giants generate MODEL "PROMPT"`: completions, streamed to the terminal or printed as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _threads_arg(v: str) -> int:
    from giants.inference.cpu_threads import parse_threads

    try:
        n = parse_threads(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n is None:
        raise argparse.ArgumentTypeError("a positive number of threads (leave --threads out for the automatic count)")
    return n


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """--threads N for every CPU command (generate, chat, serve)."""
    p.add_argument("--threads", type=_threads_arg, default=None, metavar="N",
                   help="CPU threads for the model's math. Default: all cores, dropped to fewer while other "
                        "processes keep the cores busy (measured as it runs; giants.inference.cpu_threads), or "
                        "$OMP_NUM_THREADS when set")


def _speculative_arg(v: str) -> dict:
    from giants.inference.spec_decode import SpeculativeConfig

    try:
        raw = json.loads(v)
        SpeculativeConfig.parse(raw)  # unknown keys and bad values now, before the model loads
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise argparse.ArgumentTypeError(str(e)) from None
    return raw


def add_speculative_arg(p: argparse.ArgumentParser) -> None:
    """--speculative-config JSON (generate, serve), as vLLM spells it."""
    p.add_argument("--speculative-config", type=_speculative_arg, default=None, metavar="JSON",
                   help='speculative decoding: \'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": '
                        '4}\' (prompt lookup) or \'{"model": DRAFT, "num_speculative_tokens": 4}\' (a smaller model '
                        'with the same tokenizer)')


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None and args.prompt is not None:
        raise ValueError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            return sys.stdin.read()
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    if args.prompt == "-" or (args.prompt is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if args.prompt is None:
        raise ValueError('no prompt: giants generate MODEL "PROMPT" (or --prompt-file FILE, or - to read stdin)')
    return args.prompt


def _is_preset(model: str) -> bool:
    from giants.inference.llm import _known_names
    from giants.presets import PRESETS

    return model in PRESETS and not os.path.exists(model) and model not in _known_names()


def _check_preset_tokenizer(model: str) -> None:
    """A text prompt needs a tokenizer: say so before building a preset's random weights (a minute for 1B)."""
    from types import SimpleNamespace

    from giants.inference import llm
    from giants.inference.preflight import random_weights_note
    from giants.presets import PRESETS

    if llm._default_tokenizer(SimpleNamespace(config=PRESETS[model].config)) is not None:  # what LLM will use
        return
    raise ValueError(f"{model} has no tokenizer, so a text prompt cannot be encoded. {random_weights_note(model)}")


def _max_model_len(args: argparse.Namespace, text: str) -> int | None:
    """One prompt's worth of KV cache rather than the model's whole context (8192 tokens of SmolLM2 were 377 MB):
    a token is at least a byte of the prompt, plus room for the chat template and the answer."""
    if args.max_model_len is not None:
        return args.max_model_len
    try:
        if _is_preset(args.model):
            from giants.presets import PRESETS

            context = PRESETS[args.model].config.max_context
        else:
            from giants.checkpoint import load_config
            from giants.checkpoint.hub import cached_path
            from giants.inference.llm import _known_names

            path = args.model if os.path.exists(args.model) or args.model not in _known_names() \
                else cached_path(args.model)
            if not os.path.exists(path):
                return None  # still to be downloaded: the engine's default
            context = load_config(path).max_context
    except Exception:  # noqa: BLE001 - the load reports a bad model properly
        return None
    need = len(text.encode()) + len((args.system or "").encode()) + 512 + args.max_tokens
    return min(context, -(-need // 256) * 256)


def _generate(args: argparse.Namespace) -> int:
    text = _read_prompt(args)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for anything torch starts before the engine
    from giants.inference.llm import LLM
    from giants.inference.params import SamplingParams
    from giants.inference.preflight import random_weights_note

    preset = _is_preset(args.model)
    if preset:
        _check_preset_tokenizer(args.model)
        print(f"note: {random_weights_note(args.model)}", file=sys.stderr)
    chat = args.chat or args.system is not None
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
                            stop=args.stop or None)
    from giants.cpu import bulk_threads

    with bulk_threads():  # loading, fusing and packing: no spinning barriers while other jobs hold the cores
        llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=_max_model_len(args, text),
                  seed=args.seed or 0, cpu_compile=args.compile, max_num_seqs=args.n, cpu_threads=args.threads,
                  quantization=args.quantization, speculative_config=args.speculative_config)
    if chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": text}]
        prompt = llm.apply_chat_template(messages)
    else:
        prompt = text
    prompt = prompt if isinstance(prompt, str) else list(prompt)
    if args.n == 1 and not args.json:
        final = None
        for out in llm.stream(prompt, params):
            sys.stdout.write(out.outputs[0].new_text)
            sys.stdout.flush()
            final = out
        sys.stdout.write("\n")
        comps = final.outputs if final is not None else []
    else:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        if out.error:
            raise ValueError(out.error)
        comps = out.outputs
        if not args.json:
            for c in comps:
                print(f"--- completion {c.index + 1} of {args.n} ({c.finish_reason}) ---")
                print(c.text)
    if args.json:
        res = [{"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason} for c in comps]
        payload = dict(res[0]) if args.n == 1 else {"completions": res}
        payload["random_weights"] = llm.random_weights
        print(json.dumps(payload))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (preset, HF dir, .gguf or known name)")
    p.add_argument("model", help="known name (smollm2-135m), .gguf file, Hugging Face folder, or a preset (random "
                                 "weights: noise, for speed only)")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt; - (or nothing, with a pipe) reads stdin")
    p.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from FILE (- for stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (implies --chat)")
    p.add_argument("-n", type=int, default=1, help="completions of the prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per completion")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1, help="-1 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--json", action="store_true", help='print {"text", "token_ids", "finish_reason", '
                                                       '"random_weights"} (with -n: {"completions": [...]})')
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, capped "
                                                                   "by the KV cache budget)")
    p.add_argument("--compile", action="store_true",
                   help="CPU: decode through torch.compile'd layers (~2x faster; the first use compiles for 10-30 s)")
    p.add_argument("--quantization", default=None,
                   help="fp8 | fp8-block (+head): FP8 linears and experts (+mxfp4: the experts packed MXFP4 instead); "
                        "mxfp4: packed MoE experts (default: as the "
                        "checkpoint stores them; presets: none)")
    add_threads_arg(p)
    add_speculative_arg(p)
    p.set_defaults(func=_generate)
