"""`giants inspect`: what a checkpoint holds, from headers only (no tensor data is read)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from giants.checkpoint.errors import CheckpointError
from giants.checkpoint.files import check_regular, read_text


def inspect(source: str | os.PathLike) -> dict[str, Any]:
    """{format, path, config, tensors: [{name, shape, dtype, quant, bytes, file}], total_bytes, ...}."""
    from giants.checkpoint.loading import resolve

    path = resolve(source)
    if not path.is_dir():
        check_regular(path)  # a FIFO would block the first open() forever
    if path.is_file() and path.suffix == ".gguf":
        return _inspect_gguf(path)
    if path.is_file() and path.suffix == ".safetensors":
        from giants.checkpoint.safetensors_io import SafetensorsSet

        return _summary({"format": "safetensors", "path": str(path)}, SafetensorsSet([path]), None)
    if path.is_dir():
        return _inspect_dir(path)
    raise CheckpointError("expected a checkpoint directory, a .safetensors file or a .gguf file", file=path)


def _summary(out: dict[str, Any], st, cfg) -> dict[str, Any]:
    tensors = []
    for e in st.entries.values():
        quant = None
        if e.name.endswith(("_blocks", "_scales")) and e.dtype == "U8":
            quant = "MXFP4"
        tensors.append({"name": e.name, "shape": list(e.shape), "dtype": e.dtype, "quant": quant,
                        "bytes": e.nbytes, "file": e.file.name})
    out.update(tensors=tensors, total_bytes=sum(t["bytes"] for t in tensors), n_tensors=len(tensors),
               files=[f.name for f in st.files], metadata=st.metadata)
    if cfg is not None:
        out["config"] = cfg.to_dict()
        out["params"] = _params(cfg)
    return out


def _params(cfg) -> dict[str, int]:
    from giants.analysis.params import count_params

    pc = count_params(cfg)
    return {"total": int(pc.total), "active": int(pc.active)}


def _inspect_dir(path: Path) -> dict[str, Any]:
    from giants.checkpoint.loading import read_dir

    cfg, naming, st = read_dir(path)
    out: dict[str, Any] = {"format": "hf" if naming == "hf" else "giants", "path": str(path),
                           "files_present": sorted(p.name for p in path.iterdir() if not p.name.startswith("."))}
    hf = path / "config.json"
    if hf.is_file():
        d = json.loads(read_text(hf))
        out["model_type"] = d.get("model_type")
        if d.get("quantization_config"):
            out["quantization"] = d["quantization_config"]
    out["tokenizer"] = (path / "tokenizer.json").is_file()
    return _summary(out, st, cfg)


def _inspect_gguf(path: Path) -> dict[str, Any]:
    from giants.checkpoint.gguf_io import GGUFFile, gguf_metadata, open_gguf

    reader = open_gguf(path)
    meta = gguf_metadata(reader, path)
    shown = {k: (f"[{len(v)} values]" if isinstance(v, list) and len(v) > 16 else v) for k, v in meta.items()}
    if isinstance(shown.get("tokenizer.chat_template"), str) and len(shown["tokenizer.chat_template"]) > 200:
        shown["tokenizer.chat_template"] = shown["tokenizer.chat_template"][:200] + "..."
    tensors = [{"name": t.name, "shape": [int(d) for d in reversed(t.shape.tolist())], "dtype": t.tensor_type.name,
                "quant": t.tensor_type.name, "bytes": int(t.n_bytes), "file": path.name} for t in reader.tensors]
    out: dict[str, Any] = {"format": "gguf", "path": str(path), "architecture": meta.get("general.architecture"),
                           "metadata": shown, "tensors": tensors, "n_tensors": len(tensors),
                           "total_bytes": sum(t["bytes"] for t in tensors), "files": [path.name]}
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t["quant"]] = counts.get(t["quant"], 0) + 1
    out["quant_types"] = counts
    try:
        cfg = GGUFFile(path).config
        out["config"] = cfg.to_dict()
        out["params"] = _params(cfg)
    except CheckpointError as e:
        out["config_error"] = str(e)
    return out


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def print_report(info: dict[str, Any], max_tensors: int | None = 40) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not con.is_terminal:  # piped: don't squeeze tensor names into 80 columns
        con = Console(width=200)
    con.print(f"[bold]{info['path']}[/bold]  format={info['format']}"
              + (f"  architecture={info['architecture']}" if info.get("architecture") else "")
              + (f"  model_type={info['model_type']}" if info.get("model_type") else ""))
    con.print(f"{info['n_tensors']} tensors, {_fmt_bytes(info['total_bytes'])} in {', '.join(info['files'])}")
    if info.get("quant_types"):
        con.print("quant types: " + ", ".join(f"{k} x{v}" for k, v in sorted(info["quant_types"].items())))
    if info.get("quantization"):
        con.print(f"quantization_config: {info['quantization']}")
    if "config" in info:
        c = info["config"]
        keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "n_experts",
                "experts_per_token", "max_context", "activation", "norm_kind", "position", "rope_theta",
                "rope_scaling", "layer_windows", "attn_softcap", "final_softcap", "attn_sinks", "tie_embeddings")
        table = Table(title="config (giants)")
        table.add_column("field")
        table.add_column("value")
        for k in keys:
            table.add_row(k, str(c[k]))
        p = info["params"]
        table.add_row("params total / active", f"{p['total']:,} / {p['active']:,}")
        con.print(table)
    if info.get("config_error"):
        con.print(f"[red]config: {info['config_error']}[/red]")
    if info["format"] == "gguf":
        table = Table(title="metadata")
        table.add_column("key")
        table.add_column("value", overflow="fold")
        for k, v in info["metadata"].items():
            table.add_row(k, str(v))
        con.print(table)
    table = Table(title="tensors")
    for col in ("name", "shape", "dtype", "quant", "size", "file"):
        table.add_column(col, overflow="fold")
    rows = info["tensors"] if max_tensors is None else info["tensors"][:max_tensors]
    for t in rows:
        table.add_row(t["name"], "x".join(map(str, t["shape"])) or "scalar", t["dtype"], t["quant"] or "-",
                      _fmt_bytes(t["bytes"]), t["file"])
    con.print(table)
    if max_tensors is not None and len(info["tensors"]) > max_tensors:
        con.print(f"... {len(info['tensors']) - max_tensors} more (use --all)")
