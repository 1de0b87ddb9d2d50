"""`giants serve` and `giants chat`."""

from __future__ import annotations

import argparse
import os
import sys

from giants.serve import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_SEQS_PER_REQUEST,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TEMPLATE_TIMEOUT,
)


def _positive(kind: type, minimum: float = 1e-300):
    def parse(v: str):
        x = kind(v)
        if x < minimum:
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if minimum == 0 else '> 0'} (got {v})")
        return x
    return parse


def _api_key(v: str) -> str:
    if not v.strip():
        raise argparse.ArgumentTypeError("empty (an empty key would turn authentication off); leave --api-key out "
                                         "to serve without one")
    return v


def _env_api_key() -> str | None:
    """$GIANTS_API_KEY; set but empty is an error rather than no authentication."""
    v = os.environ.get("GIANTS_API_KEY")
    if v is not None and not v.strip():
        print("giants serve: error: GIANTS_API_KEY is set but empty (an empty key would turn authentication off); "
              "unset it to serve without a key", file=sys.stderr)
        raise SystemExit(2)
    return v


def _placement_arg(parser: str):
    def parse(v: str):
        from giants.inference import placement

        try:
            return getattr(placement, parser)(v)
        except (ValueError, OSError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _serve(args: argparse.Namespace) -> int:
    from giants.serve.server import ServeOptions, serve

    if args.api_key is None:
        args.api_key = _env_api_key()
    opts = ServeOptions(model=args.model, quantization=args.quantization,
                        host=args.host, port=args.port, api_key=args.api_key,
                        max_model_len=args.max_model_len, max_queue=args.max_queue, max_num_seqs=args.max_num_seqs,
                        num_blocks=args.num_blocks, served_model_name=args.served_model_name, dtype=args.dtype,
                        device=args.device, seed=args.seed, max_body=args.max_body_bytes,
                        drain_timeout=args.drain_timeout, log_level=args.log_level, compile=args.compile,
                        request_timeout=args.request_timeout or None,
                        tensor_parallel_size=args.tensor_parallel_size, device_map=args.device_map,
                        max_memory=args.max_memory, offload_folder=args.offload_folder,
                        max_seqs_per_request=args.max_seqs_per_request, header_timeout=args.header_timeout,
                        body_timeout=args.body_timeout or None, max_connections=args.max_connections,
                        chat_template_timeout=args.chat_template_timeout, threads=args.threads,
                        stats_interval=args.log_interval, speculative_config=args.speculative_config)
    return serve(opts)


def _chat(args: argparse.Namespace) -> int:
    from giants.serve.chat import ChatOptions, chat

    return chat(ChatOptions(model=args.model, system=args.system, max_tokens=args.max_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            max_model_len=args.max_model_len, dtype=args.dtype, device=args.device,
                            compile=args.compile, threads=args.threads))


def register(sub: argparse._SubParsersAction) -> None:
    from giants.inference.cli import add_speculative_arg, add_threads_arg

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server over the continuous-batching engine")
    p.add_argument("model", help="preset (tiny-llama), known model (smollm2-135m), HF directory or .gguf file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", type=_api_key, default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $GIANTS_API_KEY, which keeps the key "
                        "out of process listings); an empty key is an error, and listening beyond loopback without "
                        "a key prints a warning")
    p.add_argument("--max-model-len", type=_positive(int), default=None, help="context length (default: model's)")
    p.add_argument("--max-queue", type=_positive(int, 0), default=DEFAULT_MAX_QUEUE,
                   help="sequences (prompts x n) allowed to wait beyond the running batch (--max-num-seqs); more "
                        f"get 429 with Retry-After (default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-seqs-per-request", type=_positive(int), default=DEFAULT_MAX_SEQS_PER_REQUEST,
                   help=f"prompts x n of one request; more get 400 (default: {DEFAULT_MAX_SEQS_PER_REQUEST})")
    p.add_argument("--max-num-seqs", type=_positive(int), default=256, help="sequences in the running batch")
    p.add_argument("--num-blocks", type=_positive(int), default=None, help="KV cache blocks (default: auto)")
    p.add_argument("--served-model-name", default=None, help="the `model` clients ask for (default: MODEL)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed for random presets' weights and unseeded sampling")
    p.add_argument("--tensor-parallel-size", "-tp", type=_positive(int), default=1,
                   help="split the model over N processes (N GPUs with --device cuda; on the CPU N processes)")
    p.add_argument("--device-map", type=_placement_arg("parse_device_map_arg"), default=None,
                   help="place whole blocks: auto | balanced | sequential | JSON {module: device} | @file.json; blocks "
                        "that do not fit the GPUs stay in host memory and are streamed each step (see `giants fit`)")
    p.add_argument("--max-memory", type=_placement_arg("parse_max_memory_arg"), default=None,
                   help="weight budgets for --device-map, e.g. 0=62GiB,1=70GiB,cpu=200GiB")
    p.add_argument("--offload-folder", default=None, help="directory for blocks --device-map puts on 'disk'")
    p.add_argument("--max-body-bytes", type=_positive(int), default=4 * 1024 * 1024, help="larger bodies get 413")
    p.add_argument("--drain-timeout", type=_positive(float, 0), default=30.0,
                   help="on SIGTERM, seconds in-flight requests may run before they are ended")
    p.add_argument("--request-timeout", type=_positive(float, 0), default=DEFAULT_REQUEST_TIMEOUT,
                   help="seconds a request may take from arrival to its last token; then it is aborted (its KV "
                        f"blocks freed) and answered 408 (default: {DEFAULT_REQUEST_TIMEOUT:g}; 0: no limit)")
    p.add_argument("--header-timeout", type=_positive(float), default=DEFAULT_HEADER_TIMEOUT,
                   help="seconds a connection has to send a request's line and headers; then it is closed "
                        f"(default: {DEFAULT_HEADER_TIMEOUT:g})")
    p.add_argument("--body-timeout", type=_positive(float, 0), default=DEFAULT_BODY_TIMEOUT,
                   help="seconds a request's body has to arrive after its headers; then 408 and the connection is "
                        f"closed (default: {DEFAULT_BODY_TIMEOUT:g}; 0: no limit)")
    p.add_argument("--max-connections", type=_positive(int), default=None,
                   help="open connections; one more is answered 503 and closed (default: "
                        f"{DEFAULT_MAX_CONNECTIONS}, or the descriptor limit less 128 if lower)")
    p.add_argument("--chat-template-timeout", type=_positive(float), default=DEFAULT_TEMPLATE_TIMEOUT,
                   help="seconds the model's chat template may take to render a request (in a worker process); "
                        f"then 400 (default: {DEFAULT_TEMPLATE_TIMEOUT:g})")
    p.add_argument("--quantization", default=None,
                   help="fp8 | fp8-block (+head): FP8 linears and experts (+mxfp4: the experts packed MXFP4 instead); "
                        "mxfp4: packed MoE experts (default: as "
                        "the checkpoint stores them; presets: none)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--log-interval", type=_positive(float, 0), default=10.0, metavar="S",
                   help="seconds between throughput log lines while requests run (0: none)")
    add_threads_arg(p)
    add_speculative_arg(p)
    p.add_argument("--compile", action="store_true",
                   help="CPU: steps where one sequence decodes run through torch.compile'd layers (the first such "
                        "step compiles, 10-30 s)")
    p.set_defaults(func=_serve)

    c = sub.add_parser("chat", help="talk to a model in the terminal (streams tokens; /reset, /exit, Ctrl-C)")
    c.add_argument("model", help="preset, known model (smollm2-135m), HF directory or .gguf file")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--max-tokens", type=_positive(int), default=512)
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--max-model-len", type=_positive(int), default=None)
    c.add_argument("--dtype", default=None)
    c.add_argument("--device", default=None)
    c.add_argument("--compile", action="store_true",
                   help="CPU: decode through torch.compile'd layers (~2x faster; the first reply compiles, 10-30 s)")
    add_threads_arg(c)
    c.set_defaults(func=_chat)
