"""`giants download`, `giants inspect`, `giants convert`."""

from __future__ import annotations

import argparse


def _download(args: argparse.Namespace) -> int:
    from giants.checkpoint import hub

    if args.name is None or args.list:
        for km in hub.KNOWN_MODELS.values():
            where = hub.cached_path(km.name)
            print(f"{km.name}\t{'cached' if where.is_file() else 'not cached'}\t{km.description}\t{where}")
        return 0
    path = hub.download(args.name, force=args.force, quiet=False)
    print(path)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from giants.checkpoint.inspection import inspect, print_report

    info = inspect(args.source)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print_report(info, None if args.all else 40)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from giants.checkpoint import loading
    from giants.checkpoint.saving import check_destination, save
    from giants.tokenizer import load_tokenizer

    try:  # before the source is loaded: a foreign destination fails at once, not after the load
        check_destination(args.dst)
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    if args.calibrate and not args.quantization:
        raise ValueError("--calibrate chooses how --quantization rounds: give --quantization fp8 or fp8-block too")
    if args.quantization and args.mxfp4:
        raise ValueError("--quantization (FP8) and --mxfp4 exclude each other")
    if args.quantization:
        from giants.inference.fp8 import parse_fp8

        if parse_fp8(args.quantization).mxfp4_experts:  # a bad option fails before the load
            raise ValueError("--quantization: '+mxfp4' (FP8 linears, MXFP4 experts) is a load-time option: an HF "
                             "checkpoint holds one quantization_config. Write FP8 here, or --mxfp4 for gpt-oss "
                             "experts, and load with quantization='fp8+mxfp4'")
    src = loading.resolve(args.src)
    model = loading.load(src, dtype=args.dtype)
    tok = None
    has_tok = src.suffix == ".gguf" or (src.is_dir() and (src / "tokenizer.json").is_file())
    if has_tok and not args.no_tokenizer:
        tok = load_tokenizer(src)
    if args.quantization:
        _quantize(model, src, args)
    try:
        out = save(model, Path(args.dst), tokenizer=tok, max_shard_size=args.max_shard_size,
                   quantize="mxfp4" if args.mxfp4 else None, format="giants" if args.giants else "hf")
    except FileExistsError as e:  # the destination changed while the source was loaded
        raise ValueError(str(e)) from None
    n = sum(p.numel() for p in model.parameters())
    n8 = sum(b.numel() for b in model.buffers() if b.dtype == torch.float8_e4m3fn)
    print(f"wrote {out} ({n + n8:,} parameters, " + (f"{n8:,} of them FP8, the rest " if n8 else "")
          + f"{next(model.parameters()).dtype}{', tokenizer' if tok is not None else ''})")
    return 0


def _quantize(model, src, args: argparse.Namespace) -> None:
    """FP8 in place: rounded to nearest, or with --calibrate by GPTQ on windows of the calibration data."""
    from giants.inference.fp8 import quantize_model

    if not args.calibrate:
        quantize_model(model, args.quantization)
        print(f"quantized to {args.quantization} (round to nearest)")
        return
    from pathlib import Path

    from giants.inference.gptq import calibration_windows, quantize_model_gptq
    from giants.tokenizer import load_tokenizer
    from giants.train.corpus import CORPORA, corpus_path

    data, tok = args.calibrate, None
    if data in CORPORA:  # a built-in corpus, prepared with this model's tokenizer
        data = corpus_path(data, args.src, progress=True)
    elif not Path(data).expanduser().is_dir():  # a text file: this model's tokenizer encodes it
        tok = load_tokenizer(src)
    tokens = calibration_windows(data, tok, args.calibration_samples, args.calibration_length)
    rep = quantize_model_gptq(model, tokens, args.quantization, progress=True)
    err = rep["output_error_rel"]
    print(f"quantized to {args.quantization} by GPTQ: {rep['calibrated_linears']} linears on {rep['tokens']:,} "
          f"calibration tokens; relative output error {err['gptq']:.4f} (round to nearest: "
          f"{err['round_to_nearest']:.4f})" + (f"; rounded to nearest: {', '.join(rep['round_to_nearest'])}"
                                               if rep["round_to_nearest"] else ""))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="fetch a known model into the user cache (e.g. smollm2-135m)")
    p.add_argument("name", nargs="?", help="known model name; omit to list them")
    p.add_argument("--force", action="store_true", help="download again even when cached")
    p.add_argument("--list", action="store_true", help="list known models and where they are cached")
    p.set_defaults(func=_download)

    p = sub.add_parser("inspect", help="show a checkpoint's config, tensors, shapes, dtypes and quant types")
    p.add_argument("source", help="HF directory, .safetensors or .gguf file, or known model name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="list every tensor (default: first 40)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("convert", help="GGUF or HF directory -> HF directory transformers can load")
    p.add_argument("src", help="HF directory, .gguf file or known model name")
    p.add_argument("dst", help="output directory: new, empty, or a checkpoint giants wrote there (replaced)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: keep; GGUF -> float32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--mxfp4", action="store_true", help="store gpt-oss experts as MXFP4 blocks + scales")
    p.add_argument("--quantization", default=None, metavar="fp8|fp8-block[+head]",
                   help="write an FP8 checkpoint (E4M3, per-channel or 128x128 block scales)")
    p.add_argument("--calibrate", default=None, metavar="DATA",
                   help="round the FP8 weights by GPTQ on this data: a UTF-8 text file, a `giants prepare` dataset "
                        "directory, or a built-in corpus name (shakespeare); default: round to nearest")
    p.add_argument("--calibration-samples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--calibration-length", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--giants", action="store_true", help="giants tensor names + giants_config.json (any config)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer")
    p.set_defaults(func=_convert)
