"""Measured runs: what a benchmark script measured on a real GPU, beside what `giants fit` computes.

The record is `measured_runs.json`, shipped in this package: one entry per run (model preset, GPU, weight format,
memory used, decode tok/s at batch 1 and at 64 concurrent, date, giants version and commit, whether the weights were
random, and the script and command that measured it). The benchmark scripts append to it with `--record`
(benchmarks/record.py, through `record_run`, an atomic write); the entries that predate `--record` were copied from
benchmarks/HISTORY.md and docs/inference.md, each naming its source. Nothing here is computed: a field a run did not
measure is null.

Random-weight runs measure speed and memory only (every GPU run so far): the bytes and kernels are those of the real
model, the tokens are not. `giants fit` and `giants report` say so next to each run.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

RUNS_PATH = Path(__file__).with_name("measured_runs.json")
PRECISIONS = ("fp32", "bf16", "fp8", "int8", "int4", "mxfp4", "fp8+mxfp4")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}( \d{2}:\d{2})?")


class RecordError(ValueError):
    """An entry of the measured-runs record that does not follow the schema."""


@dataclass(frozen=True)
class MeasuredRun:
    model: str  # a giants preset name
    gpu: str  # giants' GPU key (giants.analysis.hardware.GPUS), or "cpu"
    gpu_name: str  # as the driver names it, e.g. "NVIDIA H100 80GB HBM3"
    gpus: int
    precision: str  # the weight format, in `giants fit --dtype` terms
    quantization: str | None  # LLM(quantization=) as run, e.g. "fp8-block", "mxfp4"; None: plain float weights
    memory_gib: float | None
    memory_what: str | None  # what memory_gib is: "max allocated", "weights resident", ...
    tok_s_batch1: float | None  # decode tok/s of one sequence
    tok_s_64_concurrent: float | None  # output tok/s with 64 requests in flight
    tok_s_concurrent: dict[str, float]  # other concurrency levels measured: {"128": output tok/s}
    offload: str | None  # how much of the model was streamed from host memory, if any
    date: str  # UTC, "YYYY-MM-DD" or "YYYY-MM-DD HH:MM"
    giants_version: str
    commit: str | None  # the commit measured ("+ working tree" where it was not clean); None: not recorded
    torch: str | None
    random_weights: bool
    script: str
    command: str
    source: str  # where the numbers were first written down
    note: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def gpu_label(self) -> str:
        """Short name: "H100", "H200", "CPU"."""
        if self.gpu == "cpu":
            return "CPU"
        from giants.analysis.hardware import GPUS

        return GPUS[self.gpu].label.split()[0]

    def describe(self) -> str:
        """One line: '1 x H100, 15.96 GiB max allocated, 181.6 tok/s batch 1, bf16, random weights, 2026-12-06'."""
        parts = [f"{self.gpus} x {self.gpu_label}"]
        if self.memory_gib is not None:
            parts.append(f"{self.memory_gib:.2f} GiB" + (f" {self.memory_what}" if self.memory_what else ""))
        if self.tok_s_batch1 is not None:
            parts.append(f"{_rate(self.tok_s_batch1)} tok/s batch 1")
        conc = self.concurrency()
        if conc:
            parts.append(" / ".join(_rate(v) for v in conc.values()) + " output tok/s at "
                         + " / ".join(conc) + " concurrent")
        parts.append(self.quantization if self.quantization and self.quantization != self.precision
                     else self.precision)
        if self.offload:
            parts.append(self.offload)
        parts.append("random weights" if self.random_weights else "real weights")
        parts.append(self.date.split()[0])
        return ", ".join(parts) + f" ({self.script.removeprefix('benchmarks/')})"

    def concurrency(self) -> dict[str, float]:
        """Every concurrent-throughput figure, 64 included, by concurrency ascending."""
        out = dict(self.tok_s_concurrent)
        if self.tok_s_64_concurrent is not None:
            out["64"] = self.tok_s_64_concurrent
        return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _rate(v: float) -> str:
    return f"{v:,.2f}" if v < 10 else f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"


_FIELDS = {f.name: f for f in fields(MeasuredRun)}
_REQUIRED = {n for n, f in _FIELDS.items() if n != "note"}
_NUM = (int, float)
_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "gpu": (str,), "gpu_name": (str,), "gpus": (int,), "precision": (str,),
    "quantization": (str, type(None)), "memory_gib": (*_NUM, type(None)), "memory_what": (str, type(None)),
    "tok_s_batch1": (*_NUM, type(None)), "tok_s_64_concurrent": (*_NUM, type(None)), "tok_s_concurrent": (dict,),
    "offload": (str, type(None)), "date": (str,), "giants_version": (str,), "commit": (str, type(None)),
    "torch": (str, type(None)), "random_weights": (bool,), "script": (str,), "command": (str,), "source": (str,),
    "note": (str, type(None)),
}
assert set(_TYPES) == set(_FIELDS)


def validate(entry: dict, where: str = "entry") -> MeasuredRun:
    """A dict from the record -> MeasuredRun, or RecordError naming the first problem."""
    from giants.analysis.hardware import GPUS
    from giants.presets import PRESETS

    if not isinstance(entry, dict):
        raise RecordError(f"{where}: expected an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise RecordError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(_FIELDS)})")
    missing = sorted(_REQUIRED - set(entry))
    if missing:
        raise RecordError(f"{where}: missing field {missing[0]!r}")
    for name, value in entry.items():
        ok = _TYPES[name]
        # bool is an int subclass: a count or a rate given as true/false is a mistake
        if not isinstance(value, ok) or (isinstance(value, bool) and bool not in ok):
            raise RecordError(f"{where}: {name} must be {' or '.join(t.__name__ for t in ok)}, got {value!r}")
    if entry["model"] not in PRESETS:
        raise RecordError(f"{where}: model {entry['model']!r} is not a giants preset")
    if entry["gpu"] != "cpu" and entry["gpu"] not in GPUS:
        raise RecordError(f"{where}: gpu {entry['gpu']!r} is not one of {', '.join(GPUS)} or 'cpu'")
    if entry["gpus"] < 1:
        raise RecordError(f"{where}: gpus must be >= 1")
    if entry["precision"] not in PRECISIONS:
        raise RecordError(f"{where}: precision {entry['precision']!r} is not one of {', '.join(PRECISIONS)}")
    if not _DATE.fullmatch(entry["date"]):
        raise RecordError(f"{where}: date {entry['date']!r} is not 'YYYY-MM-DD' or 'YYYY-MM-DD HH:MM' (UTC)")
    for name in ("memory_gib", "tok_s_batch1", "tok_s_64_concurrent"):
        if entry[name] is not None and not entry[name] > 0:
            raise RecordError(f"{where}: {name} must be positive or null, got {entry[name]!r}")
    for k, v in entry["tok_s_concurrent"].items():
        if not k.isdigit() or k == "64" or isinstance(v, bool) or not isinstance(v, _NUM) or not v > 0:
            raise RecordError(f"{where}: tok_s_concurrent maps a concurrency other than 64 (tok_s_64_concurrent "
                              f"holds that one) to a positive rate, got {k!r}: {v!r}")
    if entry["tok_s_batch1"] is None and entry["tok_s_64_concurrent"] is None and not entry["tok_s_concurrent"]:
        raise RecordError(f"{where}: no rate measured (tok_s_batch1, tok_s_64_concurrent, tok_s_concurrent)")
    return MeasuredRun(**{**entry, "tok_s_concurrent": dict(entry["tok_s_concurrent"])})


def load_runs(path: str | os.PathLike | None = None) -> list[MeasuredRun]:
    """Every run of the record (the package's own unless path), validated."""
    p = Path(path) if path is not None else RUNS_PATH
    if not p.exists():
        return []
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecordError(f"{p}: not JSON ({e})") from None
    if not isinstance(data, dict) or set(data) != {"runs"} or not isinstance(data["runs"], list):
        raise RecordError(f"{p}: expected {{\"runs\": [...]}}")
    return [validate(e, f"{p.name} run {i}") for i, e in enumerate(data["runs"])]


def runs_for(model: str, gpu: str | None = None, runs: Iterable[MeasuredRun] | None = None) -> list[MeasuredRun]:
    """The runs of one preset (on one GPU key if given), newest first."""
    found = [r for r in (load_runs() if runs is None else runs)
             if r.model == model and (gpu is None or r.gpu == gpu)]
    return sorted(found, key=lambda r: r.date, reverse=True)


def _key(e: dict) -> tuple:
    # the same script, model, machine and format on the same day and commit: a re-run, which replaces the entry
    return tuple(e.get(k) for k in ("model", "gpu", "gpus", "precision", "quantization", "offload", "script",
                                    "commit")) + (e.get("date", "").split()[0],)


def record_run(entry: dict, path: str | os.PathLike | None = None) -> Path:
    """Add one run to the record, replacing a re-run of the same thing (see _key); atomic: the file is written
    beside itself and renamed over, so a reader or a killed writer never sees half a file."""
    validate(entry)
    p = Path(path) if path is not None else RUNS_PATH
    runs = [r.as_dict() for r in load_runs(p)]
    key = _key(entry)
    runs = [r for r in runs if _key(r) != key] + [{n: entry.get(n) for n in _FIELDS}]
    text = json.dumps({"runs": runs}, indent=1, ensure_ascii=False) + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def gpu_key(device_name: str, memory_bytes: int | None = None) -> str:
    """The driver's device name -> giants' GPU key ("NVIDIA H100 80GB HBM3" -> "h100-80gb"); ValueError if unknown."""
    n = device_name.upper()
    for token, key in (("H200", "h200-141gb"), ("H100", "h100-80gb"), ("L40S", "l40s-48gb"),
                       ("4090", "rtx-4090-24gb"), ("MI300X", "mi300x-192gb")):
        if token in n:
            return key
    if "A100" in n:
        small = "40GB" in n or (memory_bytes is not None and memory_bytes < 60 * 2**30)
        return "a100-40gb" if small else "a100-80gb"
    raise ValueError(f"GPU {device_name!r} is not one giants knows (giants.analysis.hardware.GPUS)")


def fit_lines(model: str, gpu: str, computed: str | None, runs: Iterable[MeasuredRun] | None = None,
              precision: str | None = None) -> list[str]:
    """`giants fit`'s lines: the computed fit, then each measured run on that GPU (or 'not measured'), with a word
    on what random-weight runs show. Runs in `precision` (the format the fit planned) come first, newest first."""
    from giants.analysis.hardware import GPUS

    all_runs = runs_for(model, runs=runs)
    here = sorted((r for r in all_runs if r.gpu == gpu), key=lambda r: r.precision != precision)  # stable
    label = GPUS[gpu].label.split()[0] if gpu in GPUS else gpu
    head = f"computed: {computed}; " if computed else ""
    if not here:
        others = sorted({(r.gpu_label, r.gpu) for r in all_runs})
        tail = (f" (measured on {', '.join(o[0] for o in others)}: giants fit --gpu "
                f"{' / '.join(o[1] for o in others)})") if others else ""
        return [f"{head}measured: not measured on {label}{tail}"]
    lines = [f"{head}measured: {here[0].describe()}"] + [f"measured: {r.describe()}" for r in here[1:]]
    if any(r.random_weights for r in here):
        lines.append("random weights = a speed and memory run (the real model's bytes and kernels, not its tokens)")
    return lines


def as_records(runs: Iterable[MeasuredRun]) -> list[dict]:
    """Rows for the report's table."""
    return [{"model": r.model, "gpu": f"{r.gpus} x {r.gpu_label}", "weights": r.quantization or r.precision,
             "memory": None if r.memory_gib is None else f"{r.memory_gib:.2f} GiB"
             + (f" ({r.memory_what})" if r.memory_what else ""),
             "tps1": r.tok_s_batch1, "tps64": r.tok_s_64_concurrent,
             "other": ", ".join(f"{_rate(v)} @{k}" for k, v in r.tok_s_concurrent.items()) or None,
             "offload": r.offload, "weights_kind": "random (speed run)" if r.random_weights else "real",
             "date": r.date, "commit": r.commit or "not recorded", "script": r.script} for r in runs]


__all__ = ["MeasuredRun", "RecordError", "RUNS_PATH", "as_records", "fit_lines", "gpu_key", "load_runs",
           "record_run", "runs_for", "validate"]
