"""`giants generate MODEL "PROMPT"`: one completion, streamed to the terminal or printed as JSON."""

from __future__ import annotations

import argparse
import json
import sys


def _generate(args: argparse.Namespace) -> int:
    from giants.inference.llm import LLM
    from giants.inference.params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, seed=args.seed or 0,
              cpu_compile=args.compile, quantization=args.quantization)
    if args.chat:
        prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
    if isinstance(prompt, str) and llm.tokenizer is None:
        raise ValueError(f"model: {args.model} has no tokenizer, so a text prompt cannot be encoded")
    final = None
    for out in llm.stream(prompt if isinstance(prompt, str) else list(prompt), params):
        if not args.json:
            sys.stdout.write(out.outputs[0].new_text)
            sys.stdout.flush()
        final = out
    comp = final.outputs[0]
    if args.json:
        print(json.dumps({"text": comp.text, "token_ids": comp.token_ids, "finish_reason": comp.finish_reason}))
    else:
        sys.stdout.write("\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (preset, HF dir, .gguf or known name)")
    p.add_argument("model", help="preset name (random weights), HF directory, .gguf file or known name")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help='print {"text", "token_ids", "finish_reason"}')
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--quantization", default=None,
                   help="fp8 | fp8-block (+head): FP8 linears and experts; mxfp4: packed MoE experts (default: as the "
                        "checkpoint stores them; presets: none)")
    p.add_argument("--compile", action="store_true",
                   help="CPU: decode through torch.compile'd layers (~2x faster; the first use compiles for 10-30 s)")
    p.set_defaults(func=_generate)
