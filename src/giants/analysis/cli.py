"""`giants compare`, `giants fit`, `giants report`."""

from __future__ import annotations

import argparse

from giants.analysis.tables import FORMATS, Column, human_bytes, human_count, render


def _positive_int(text: str) -> int:
    try:
        v = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _out(text: str) -> None:
    if text:
        print(text)


def _format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS, default="rich", help="output format (default: rich table)")


# ---- compare ---------------------------------------------------------------------------------

def _compare(args: argparse.Namespace) -> int:
    from giants.analysis.compare import compare_columns, compare_records
    from giants.analysis.memory import default_kv_dtype

    kv_dtype = args.kv_dtype or default_kv_dtype(args.dtype)
    records = compare_records(args.models or None, args.context, args.dtype, kv_dtype)
    notes = [f"active = parameters one token uses, input embedding excluded (gpt-oss model card); "
             f"active+emb adds it back (Mixtral's convention). FLOPs: one token decoded at context {args.context}. "
             "Weights: fp8 / int8 / int4 quantise attention and MLP matrices; mxfp4 (4.25 bits) only the MLP "
             "(the experts of an MoE, as gpt-oss ships), attention stays bf16, so a dense model's mxfp4 exceeds its "
             "int4. Embeddings and head stay bf16 in every format (docs/analysis.md)."]
    notes += [f"{r['preset']}: {r['note']}" for r in records if "note" in r]
    if any(r["preset"] == "gpt-oss-120b-described" for r in records):
        from giants.analysis.report import DESCRIBED_NOTE

        notes.append(DESCRIBED_NOTE)
    _out(render(records, compare_columns(args.context, kv_dtype, args.dtype), args.format,
                title=f"giants compare (context {args.context}, {args.dtype} weights, {kv_dtype} KV cache)",
                notes=notes, transpose=len(records) <= 8))
    return 0


# ---- fit -------------------------------------------------------------------------------------

PREFERENCE = ("bf16", "fp8", "int8", "mxfp4", "int4")  # best quality first


def _fit_one(args: argparse.Namespace) -> int:
    from giants.analysis.compare import resolve_model
    from giants.analysis.hardware import get_gpu
    from giants.analysis.perf import FitError, decode, fit, prefill_seconds

    label, cfg, _ = resolve_model(args.model)
    gpu = get_gpu(args.gpu)
    plan = _serve_plan(args, cfg, gpu)
    try:
        f = fit(cfg, gpu, args.context, args.batch, args.dtype, args.kv_dtype, args.num_gpus or args.max_gpus)
    except FitError:
        if args.num_gpus is None or plan.kind != "device_map":
            raise
        return _fit_placement(args, label, gpu, plan)
    d1 = decode(cfg, gpu, f.gpus, args.context, 1, args.dtype, f.kv_dtype)
    db = decode(cfg, gpu, f.gpus, args.context, args.batch, args.dtype, f.kv_dtype)
    pre = prefill_seconds(cfg, gpu, f.gpus, args.context, 1, args.dtype, f.kv_dtype)
    payload = {"model": label, **f.as_dict(cfg),
               "decode_tokens_per_s_per_seq": db.tokens_per_s_per_seq, "decode_tokens_per_s": db.tokens_per_s,
               "decode_batch1_tokens_per_s": d1.tokens_per_s, "decode_bound": db.bound,
               "prefill_seconds": pre}
    m = f.memory
    rows = [{"part": "weights", "bytes": m.weights, "why": f"{args.dtype} weights / {f.gpus} GPU(s)"},
            {"part": "KV cache", "bytes": m.kv_cache,
             "why": f"{args.batch} x {args.context} tokens, {f.kv_dtype}, {cfg.n_kv_heads} KV heads split over TP"},
            {"part": "workspace", "bytes": m.workspace, "why": "runtime ~1 GB + prefill-chunk activations + logits"},
            {"part": "total", "bytes": m.total, "why": f"of {human_bytes(gpu.memory_bytes)} per GPU, "
                                                       f"{human_bytes(f.free_bytes)} free"}]
    cols = [Column("per GPU", "part"), Column("bytes", "bytes", human_bytes), Column("why", "why", align="left")]
    title = (f"{label} on {f.gpus} x {gpu.label} ({f.layout(cfg)}), {args.dtype} weights, context {args.context}, "
             f"batch {args.batch}")
    notes = [f"roofline decode: {d1.tokens_per_s:,.0f} tok/s at batch 1; {db.tokens_per_s_per_seq:,.0f} tok/s per "
             f"sequence, {db.tokens_per_s:,.0f} tok/s aggregate at batch {args.batch} ({db.bound}-bound, upper bound)",
             f"prefill of {args.context} tokens: {pre * 1e3:,.1f} ms (roofline)"]
    payload["serve"] = plan.as_dict()
    payload["dtype_default"] = args.dtype_note is not None
    notes = _measured_notes(label, gpu, f"fits {f.gpus} x {gpu.label.split()[0]} ({human_bytes(m.total)} per GPU, "
                                        f"{args.dtype})", payload, args.dtype) + notes
    if args.dtype_note:
        notes.insert(0, args.dtype_note)
    notes += _serve_notes(args, plan)
    _out(render(rows, cols, args.format, title=title, notes=notes, json_payload=payload))
    return 0


def _measured_notes(label: str, gpu, computed: str, payload: dict, precision: str = "bf16") -> list[str]:
    """The runs a benchmark script measured for this preset (giants/analysis/measured_runs.json) beside the
    computed fit; payload gets them as "measured" (every GPU)."""
    from giants.analysis.measured_runs import fit_lines, load_runs, runs_for

    runs = load_runs()
    payload["measured"] = [r.as_dict() for r in runs_for(label, runs=runs)]
    return fit_lines(label, gpu.name, computed, runs, precision)


def _serve_plan(args: argparse.Namespace, cfg, gpu):
    from giants.analysis.serve_plan import propose, propose_fp8, serve_dtype

    args.serve_dtype = serve_dtype(cfg, args.dtype)
    args.is_moe = cfg.is_moe
    if args.dtype in ("fp8", "fp8+mxfp4") and (plan := propose_fp8(cfg, args.model, gpu, args.context, args.batch,
                                                                   args.kv_dtype, args.dtype)):
        args.serve_dtype = args.dtype
        return plan
    kv = args.kv_dtype if args.serve_dtype == args.dtype else None
    return propose(cfg, args.model, gpu, args.num_gpus or args.max_gpus, args.context, args.batch, args.serve_dtype,
                   kv)


def _serve_notes(args: argparse.Namespace, plan) -> list[str]:
    notes = [f"giants serve tensor parallel size {tp} refused: {why}" for tp, why in plan.skipped.items()]
    if args.serve_dtype != args.dtype:
        why = ("its FP8 weights run on one GPU only, not under tensor parallelism or layer placement"
               if args.dtype == "fp8" or (args.dtype == "fp8+mxfp4" and args.is_moe) else
               "+mxfp4 packs MoE experts, and this model has none" if args.dtype == "fp8+mxfp4"
               else f"no flag for {args.dtype}")
        notes.append(f"giants serve runs {args.serve_dtype} weights here ({why}): planned in bf16")
    return notes + [f"serve with: {plan.command}"]


def _fit_placement(args: argparse.Namespace, label: str, gpu, plan) -> int:
    """No tensor-parallel size fits the machine's GPUs: the layer placement that does (blocks streamed)."""
    rows = [{"device": d, "bytes": b, "why": "weights budget: the card at 90% less its KV cache and workspace"
             if d != "cpu" else f"{plan.blocks_streamed} blocks in pinned host memory, streamed every step"}
            for d, b in plan.max_memory.items()]
    rows.append({"device": "streamed/step", "bytes": plan.streamed_bytes_per_step,
                 "why": "host -> GPU 0 copies per decode step (the speed limit)"})
    cols = [Column("device", "device"), Column("bytes", "bytes", human_bytes), Column("why", "why", align="left")]
    n = args.num_gpus
    title = (f"{label} does not fit {n} x {gpu.label} with tensor parallelism ({args.serve_dtype} weights, context "
             f"{args.context}, batch {args.batch}): layer placement, {plan.blocks_on_gpus} blocks on the GPU(s), "
             f"{plan.blocks_streamed} streamed from host memory")
    notes = [f"roofline decode with streaming: {plan.decode_tokens_per_s:.2f} tok/s at batch 1 (the host link moves "
             "every streamed block each step; upper bound)"] + _serve_notes(args, plan)
    payload = {"model": label, "gpu": gpu.name, "num_gpus": n, "fits_tensor_parallel": False,
               "serve": plan.as_dict()}
    notes = _measured_notes(label, gpu, f"does not fit {n} x {gpu.label.split()[0]} with tensor parallelism; "
                                        f"{plan.blocks_streamed} blocks streamed", payload) + notes
    _out(render(rows, cols, args.format, title=title, notes=notes, json_payload=payload))
    return 0


def _fit_budget(args: argparse.Namespace) -> int:
    from giants.analysis.compare import REAL_PRESETS, published_format, resolve_model
    from giants.analysis.hardware import parse_budget
    from giants.analysis.params import count_params
    from giants.analysis.perf import FitError, decode, fit

    count, gpu = parse_budget(args.budget)
    names = [args.model] if args.model else list(REAL_PRESETS)
    records = []
    for spec in names:
        label, cfg, _ = resolve_model(spec)
        # Wider formats than the published one add bytes, not quality: start the preference there.
        dtypes = [args.dtype] if args.dtype_given else list(PREFERENCE[PREFERENCE.index(published_format(label)):])
        rec: dict = {"preset": label, "params_total": count_params(cfg).total, "fits": False}
        if args.context > cfg.max_context:
            rec["why_not"] = f"context {args.context} > max_context {cfg.max_context}"
            records.append(rec)
            continue
        last_err = ""
        for dt in dtypes:
            try:
                f = fit(cfg, gpu, args.context, args.batch, dt, args.kv_dtype, max_gpus=count)
            except FitError as e:
                last_err = str(e)
                continue
            d1 = decode(cfg, gpu, f.gpus, args.context, 1, dt, f.kv_dtype)
            db = decode(cfg, gpu, f.gpus, args.context, args.batch, dt, f.kv_dtype)
            rec.update(fits=True, dtype=dt, gpus=f.gpus, memory_per_gpu_bytes=f.memory.total,
                       decode_batch1_tokens_per_s=d1.tokens_per_s, decode_tokens_per_s=db.tokens_per_s,
                       decode_tokens_per_s_per_seq=db.tokens_per_s_per_seq)
            break
        else:
            rec["why_not"] = last_err.split(":", 1)[-1].split(";")[0].strip()
        records.append(rec)
    records.sort(key=lambda r: (not r["fits"], -r["params_total"]))
    cols = [Column("model", "preset"), Column("params", "params_total", human_count),
            Column("fits", "fits", lambda v: "yes" if v else "no"), Column("best dtype", "dtype"),
            Column("GPUs used", "gpus"), Column("memory/GPU", "memory_per_gpu_bytes", human_bytes),
            Column("tok/s @1", "decode_batch1_tokens_per_s", lambda v: f"{v:,.0f}"),
            Column(f"tok/s/seq @{args.batch}", "decode_tokens_per_s_per_seq", lambda v: f"{v:,.0f}"),
            Column(f"tok/s total @{args.batch}", "decode_tokens_per_s", lambda v: f"{v:,.0f}"),
            Column("why not", "why_not", align="left")]
    payload = {"budget": {"gpus": count, "gpu": gpu.name}, "context": args.context, "batch": args.batch,
               "models": records}
    _out(render(records, cols, args.format, json_payload=payload,
                title=f"which models fit {count} x {gpu.label} (context {args.context}, batch {args.batch})",
                notes=["best dtype = the highest-quality weight format that fits (bf16 > fp8 > int8 > mxfp4 > int4), "
                       "starting from the published one (gpt-oss: mxfp4); tok/s are roofline upper bounds"]))
    return 0


def _fit_train(args: argparse.Namespace) -> int:
    from giants.analysis.compare import resolve_model
    from giants.analysis.flops import training_flops_per_token
    from giants.analysis.hardware import get_gpu
    from giants.analysis.memory import training_memory
    from giants.analysis.perf import training_gpu_days

    label, cfg, _ = resolve_model(args.model)
    gpu = get_gpu(args.gpu)

    def mem(dp: int):
        return training_memory(cfg, micro_batch=args.micro_batch, seq_len=args.seq_len, param_dtype=args.param_dtype,
                               zero_stage=args.zero, dp=dp, tp=args.tp, checkpointing=not args.no_checkpointing)

    if args.dp:
        dp = args.dp
    else:
        dp = next((d for d in (2**i for i in range(17)) if mem(d).total <= gpu.memory_bytes), 0)
        if not dp:
            m = mem(2**16)
            raise ValueError(f"{label} cannot train on {gpu.label} with these settings: even fully sharded, "
                             f"activations need {human_bytes(m.activations + m.logits)} per GPU; enable "
                             f"activation checkpointing, lower --micro-batch / --seq-len or raise --tp")
    m = mem(dp)
    days = training_gpu_days(cfg, gpu, args.tokens, args.mfu, args.seq_len)
    payload = {"model": label, "gpu": gpu.name, "dp": dp, "tp": args.tp, "gpus": dp * args.tp,
               "zero_stage": args.zero, "checkpointing": not args.no_checkpointing, "micro_batch": args.micro_batch,
               "seq_len": args.seq_len, "param_dtype": args.param_dtype,
               "fits": m.total <= gpu.memory_bytes, "memory_per_gpu_bytes": m.total, "memory_per_gpu": m.as_dict(),
               "training_flops_per_token": training_flops_per_token(cfg, args.seq_len), "tokens": args.tokens,
               "mfu": args.mfu, "gpu_days": days, "days_on_these_gpus": days / (dp * args.tp)}
    rows = [{"part": k, "bytes": v} for k, v in m.as_dict().items()]
    verdict = "fits" if payload["fits"] else "does NOT fit"
    title = (f"train {label} on {dp * args.tp} x {gpu.label} (ZeRO-{args.zero} over {dp}, TP {args.tp}, micro-batch "
             f"{args.micro_batch} x {args.seq_len}): {human_bytes(m.total)} per GPU, {verdict}")
    notes = [f"{human_count(args.tokens)} tokens at {args.mfu:.0%} MFU: {days:,.0f} GPU-days "
             f"({days / (dp * args.tp):,.1f} days on {dp * args.tp} GPUs)"]
    _out(render(rows, [Column("per GPU", "part"), Column("bytes", "bytes", human_bytes)], args.format, title=title,
                notes=notes, json_payload=payload))
    if not payload["fits"]:  # as serving a model that does not fit: exit 2, after the breakdown
        import sys

        print(f"giants fit: error: training {label} does not fit {gpu.label}: {human_bytes(m.total)} per GPU at "
              f"ZeRO-{args.zero} over {dp}; raise --dp / --tp, lower --micro-batch / --seq-len or leave --dp out",
              file=sys.stderr)
        return 2
    return 0


def _fit(args: argparse.Namespace) -> int:
    from giants.analysis.memory import WEIGHT_FORMATS

    args.dtype_given = args.dtype is not None
    args.dtype_note = None
    if not args.dtype_given and args.model and not args.budget and not args.train:
        from giants.analysis.compare import published_format, resolve_model

        label = resolve_model(args.model)[0]
        args.dtype = published_format(label)  # as the model ships: gpt-oss's MXFP4 experts, else bf16
        args.dtype_note = (f"weights: {args.dtype}, the format {label} is published in"
                           + (" (MXFP4 experts, bf16 attention and embeddings: model card)" if args.dtype == "mxfp4"
                              else "") + "; --dtype bf16 / fp8 / int4 / mxfp4 plans another")
    args.dtype = args.dtype or "bf16"
    if args.dtype not in WEIGHT_FORMATS:
        raise ValueError(f"--dtype {args.dtype!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if args.budget:
        return _fit_budget(args)
    if not args.model:
        raise ValueError("name a MODEL (preset or config.json) or give --budget 'COUNTx GPU'")
    return _fit_train(args) if args.train else _fit_one(args)


# ---- report ----------------------------------------------------------------------------------

def _report(args: argparse.Namespace) -> int:
    from giants.analysis.report import write_report

    paths = write_report(args.out, context=args.context)
    cols = [Column("claim", "claim"), Column("verdict", "verdict", align="left"),
            Column("computed evidence", "evidence", align="left")]
    _out(render(paths["claims"], cols, args.format, title="the claims of a popular comparison article (GPT-OSS-120B, "
                "Llama 3 70B, Gemma 2 27B, Mixtral 8x22B), checked"))
    if args.format in ("rich", "md"):
        print(f"report written: {paths['html']} and {paths['md']} ({len(paths['plots'])} plots)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from giants.analysis.hardware import GPUS
    from giants.analysis.memory import DTYPE_BYTES, WEIGHT_FORMATS

    p = sub.add_parser("compare", help="parameters, FLOPs, KV cache and weight bytes side by side",
                       description="Compare presets or config.json files (default: the four models a popular "
                                   "comparison article compares, and gpt-oss-120b as that article describes it, "
                                   "with dimensions chosen by giants).")
    p.add_argument("models", nargs="*", metavar="PRESET|config.json")
    p.add_argument("--context", type=_positive_int, default=8192, help="tokens in context (default 8192)")
    p.add_argument("--dtype", choices=WEIGHT_FORMATS, default="bf16", help="weight format for serving memory")
    p.add_argument("--kv-dtype", choices=list(DTYPE_BYTES), default=None,
                   help="KV-cache dtype (default: --dtype; bf16 for the 4-bit weight formats)")
    _format_arg(p)
    p.set_defaults(func=_compare)

    p = sub.add_parser("fit", help="how many GPUs a model needs, and why; or which models fit a budget",
                       description="Fewest GPUs (tensor parallel within one node) to serve MODEL, with the memory "
                                   "breakdown; --budget lists which presets fit given GPUs; --train sizes training.")
    p.add_argument("model", nargs="?", metavar="MODEL", help="preset name or config.json path")
    p.add_argument("--gpu", default="h100-80gb", help=f"one of {', '.join(GPUS)} (default h100-80gb)")
    p.add_argument("--budget", default=None, help="COUNTx GPU, e.g. '2x a100-80gb': which presets fit")
    p.add_argument("--context", type=_positive_int, default=8192)
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--dtype", default=None, help=f"weight format: {', '.join(WEIGHT_FORMATS)} (default bf16)")
    p.add_argument("--kv-dtype", choices=list(DTYPE_BYTES), default=None)
    p.add_argument("--max-gpus", type=_positive_int, default=8, help="GPUs in one node (default 8)")
    p.add_argument("--num-gpus", type=_positive_int, default=None,
                   help="GPUs on the serving machine: the tensor-parallel size proposed stays within it, and when "
                        "none fits, a --device-map placement with blocks streamed from host memory is proposed")
    t = p.add_argument_group("training (--train)")
    t.add_argument("--train", action="store_true", help="size AdamW training instead of serving")
    t.add_argument("--tokens", type=float, default=1e12, help="training tokens for GPU-days (default 1e12)")
    t.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    t.add_argument("--seq-len", type=_positive_int, default=4096)
    t.add_argument("--micro-batch", type=_positive_int, default=1)
    t.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=3, help="ZeRO stage (3 = FSDP)")
    t.add_argument("--dp", type=_positive_int, default=None, help="sharding degree (default: fewest that fits)")
    t.add_argument("--tp", type=_positive_int, default=1)
    t.add_argument("--param-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    t.add_argument("--no-checkpointing", action="store_true", help="keep all activations")
    _format_arg(p)
    p.set_defaults(func=_fit)

    p = sub.add_parser("report", help="HTML + Markdown deep-dive with plots and a popular comparison article's "
                                      "claims checked")
    p.add_argument("--out", default="report", help="output folder (default report/)")
    p.add_argument("--context", type=_positive_int, default=8192)
    _format_arg(p)
    p.set_defaults(func=_report)

