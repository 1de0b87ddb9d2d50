"""The record of measured GPU runs (giants/analysis/measured_runs.json): its schema, `giants fit` and the report
showing it beside the computed fit, and the benchmark scripts' --record writer (benchmarks/record.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from giants.analysis import measured_runs as mr
from giants.analysis.claims import check_claims
from giants.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _entry(**changes) -> dict:
    e = {"model": "llama-3.1-8b", "gpu": "h100-80gb", "gpu_name": "NVIDIA H100 80GB HBM3", "gpus": 1,
         "precision": "fp8", "quantization": "fp8-block", "memory_gib": 9.61, "memory_what": "max allocated",
         "tok_s_batch1": 281.0, "tok_s_64_concurrent": None, "tok_s_concurrent": {}, "offload": None,
         "date": "2026-12-06", "giants_version": "0.1.0", "commit": None, "torch": "2.11", "random_weights": True,
         "script": "benchmarks/bench_fp8.py", "command": "python benchmarks/bench_fp8.py", "source": "test",
         "note": None}
    e.update(changes)
    return e


# ---- the shipped record ----------------------------------------------------------------------------------
def test_the_shipped_record_loads_and_validates():
    raw = json.loads(mr.RUNS_PATH.read_text())
    assert set(raw) == {"runs"}
    fields = set(mr.MeasuredRun.__dataclass_fields__)
    for e in raw["runs"]:
        assert set(e) == fields  # every field written, none unknown
    runs = mr.load_runs()
    assert len(runs) == len(raw["runs"]) >= 10
    # the runs copied from benchmarks/HISTORY.md and the bench_fp8 runs of 2026-12-06, as written there
    oss = [r for r in runs if (r.model, r.gpu, r.date) == ("gpt-oss-120b", "h100-80gb", "2026-11-23 20:01")]
    assert len(oss) == 1 and oss[0].tok_s_batch1 == 147.1 and oss[0].precision == "mxfp4" and oss[0].commit == "2ede16e"
    fp8 = {(r.commit, r.quantization): (r.tok_s_batch1, r.memory_gib) for r in runs
           if r.script == "benchmarks/bench_fp8.py" and r.model == "llama-3.1-8b"}
    assert fp8 == {("9114e6f", None): (181.6, 15.96), ("9114e6f", "fp8"): (252.0, 15.52),
                   ("9114e6f", "fp8+head"): (262.1, 10.57), ("9114e6f", "fp8-block"): (281.0, 9.61),
                   # the batch-1 chain on FP8 weights (2026-12-06 22:24)
                   ("9f49d2d", None): (180.68, 15.96), ("9f49d2d", "fp8-block+head"): (299.13, 15.52),
                   ("9f49d2d", "fp8+head"): (279.36, 10.57),
                   # attention splits combined in-kernel, the ticketless chain (2026-12-07 01:57; the FP8 figure is the
                   # same-run rerun without the O-weight prefetch, the code since)
                   ("157ff2b", None): (178.81, 15.96), ("157ff2b", "fp8-block+head"): (311.87, 15.52),
                   # each batch-1 GEMV's first weight tile loaded before the PDL wait (2026-12-07 07:54)
                   ("5c5ae58", None): (190.93, 15.96), ("5c5ae58", "fp8-block+head"): (329.45, 15.52)}
    big = {r.quantization: r for r in runs if r.model == "llama-3-70b"}
    assert big[None].tok_s_batch1 == 0.63 and "streamed" in big[None].offload
    assert (big["fp8+head"].tok_s_batch1, big["fp8+head"].tok_s_concurrent) == (30.8, {"32": 163.5})
    later = {r.model: r for r in runs if r.commit == "94c5a3e"}  # the H100 runs of 2026-12-06 afternoon
    assert (later["gpt-oss-120b"].tok_s_batch1, later["gemma-2-27b"].tok_s_batch1) == (264.6, 53.7)
    # Mixtral-8x22B on one 80 GB H100: FP8 linears and head, MXFP4 experts (2026-12-07 13:03)
    mix = [r for r in runs if r.model == "mixtral-8x22b"]
    assert [(r.gpu, r.precision, r.quantization, r.tok_s_batch1, r.memory_gib, r.commit) for r in mix] == [
        ("h100-80gb", "fp8+mxfp4", "fp8+head+mxfp4", 85.9, 76.21, "2706444")]
    assert all(r.random_weights for r in runs)  # every GPU run so far: random weights


def test_package_data_ships_the_record():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "analysis/measured_runs.json" in cfg["tool"]["setuptools"]["package-data"]["giants"]
    assert mr.RUNS_PATH.parent == Path(mr.__file__).parent


@pytest.mark.parametrize("change, words", [
    ({"speed": 1.0}, "unknown field 'speed'"),
    ({"gpus": True}, "gpus must be int"),
    ({"tok_s_batch1": "fast"}, "tok_s_batch1 must be"),
    ({"gpu": "h100"}, "is not one of"),
    ({"model": "llama-9"}, "not a giants preset"),
    ({"precision": "fp4"}, "precision"),
    ({"date": "Dec 6"}, "date"),
    ({"tok_s_batch1": None}, "no rate measured"),
    ({"tok_s_concurrent": {"64": 5.0}}, "tok_s_64_concurrent holds that one"),
    ({"memory_gib": -1.0}, "positive"),
])
def test_bad_entries_are_refused(change, words):
    with pytest.raises(mr.RecordError, match=words.replace("(", r"\(").replace("+", r"\+")):
        mr.validate(_entry(**change))
    e = _entry()
    del e["random_weights"]
    with pytest.raises(mr.RecordError, match="missing field 'random_weights'"):
        mr.validate(e)


def test_a_bad_record_file_is_refused(tmp_path):
    p = tmp_path / "runs.json"
    p.write_text(json.dumps({"runs": [_entry(extra=1)]}))
    with pytest.raises(mr.RecordError, match="run 0: unknown field 'extra'"):
        mr.load_runs(p)
    p.write_text("[]")
    with pytest.raises(mr.RecordError, match="expected"):
        mr.load_runs(p)


# ---- giants fit and the report -------------------------------------------------------------------------
def _fit(capsys, *argv: str) -> str:
    assert main(["fit", *argv]) == 0
    return capsys.readouterr().out


def test_fit_prints_the_measured_runs_beside_the_computed_fit(capsys):
    out = " ".join(_fit(capsys, "llama-3.1-8b", "--gpu", "h100-80gb").split())  # rich wraps long lines
    assert "computed: fits 1 x H100" in out
    assert "measured: 1 x H100, 9.61 GiB max allocated, 281.0 tok/s batch 1, fp8-block, random weights, 2026-12-06" \
        in out
    assert "random weights = a speed and memory run" in out
    r = json.loads(_fit(capsys, "llama-3.1-8b", "--gpu", "h100-80gb", "--format", "json"))
    assert {(m["gpu"], m["quantization"], m["tok_s_batch1"]) for m in r["measured"]} >= {
        ("h100-80gb", "fp8-block", 281.0), ("h200-141gb", None, 237.2)}
    # layer placement (no tensor-parallel fit on one GPU): the offloaded run
    out = " ".join(_fit(capsys, "llama-3-70b", "--gpu", "h100-80gb", "--num-gpus", "1").split())
    assert "computed: does not fit 1 x H100" in out and "0.63 tok/s batch 1" in out
    out = " ".join(_fit(capsys, "llama-3-70b", "--gpu", "h100-80gb", "--dtype", "fp8").split())
    assert "fp8); measured: 1 x H100, 71.01 GiB allocated, 30.8 tok/s batch 1, 163.5 output tok/s at 32 concurrent, " \
           "fp8+head, random weights, 2026-12-06" in out  # the planned format's runs first


def test_fit_says_not_measured(capsys):
    out = " ".join(_fit(capsys, "gemma-2-9b", "--gpu", "h100-80gb").split())
    assert "computed: fits 1 x H100" in out and "measured: not measured on H100" in out
    out = " ".join(_fit(capsys, "gemma-2-27b", "--gpu", "h100-80gb").split())
    assert "computed: fits 1 x H100" in out and "measured: 1 x H100, 53.7 tok/s batch 1, bf16" in out
    out = " ".join(_fit(capsys, "gpt-oss-20b", "--gpu", "a100-80gb").split())
    assert "measured: not measured on A100 (measured on H100, H200: giants fit --gpu h100-80gb / h200-141gb)" in out
    assert json.loads(_fit(capsys, "gemma-2-9b", "--format", "json"))["measured"] == []


def test_claims_and_report_show_the_measured_runs(tmp_path, monkeypatch):
    ev = {c.id: c.evidence for c in check_claims()}
    assert ("measured: 1 x H100, 65.75 GiB max allocated by torch (weights, KV cache, CUDA graphs), 350.4 tok/s "
            "batch 1, mxfp4, random weights, 2026-12-06") in ev["gpt-oss-8xh100"]
    assert "measured: not measured on A100" in ev["gemma-1xa100"]
    import giants.analysis.report as report

    for name in ("plot_params", "plot_kv", "plot_serving", "plot_decode", "plot_fit"):  # the tables are the point
        monkeypatch.setattr(report, name, lambda path, *a: Path(path).write_bytes(b"\x89PNG\r\n\x1a\n"))
    out = report.write_report(tmp_path)
    md = out["md"].read_text()
    section = md.split("## Measured runs", 1)[1].split("\n## ", 1)[0]
    n = len(mr.load_runs())
    assert f"{n} of {n} runs used random weights" in section and "speed and memory run" in section
    assert section.count("random (speed run)") == n
    assert "| llama-3.1-8b | 1 x H100 | fp8-block | 9.61 GiB (max allocated) | 281.0 |" in section
    assert "| llama-3-70b | 1 x H100 | bf16 |" in section and "| 0.63 |" in section
    serving = md.split("## Serving the compared models", 1)[1].split("\n## ", 1)[0]
    assert "measured on H100 (newest run)" in serving and "not measured on H100" in serving
    assert "Measured runs" in out["html"].read_text()


# ---- the benchmark scripts' writer ----------------------------------------------------------------------
def test_record_run_round_trips_and_replaces_a_rerun(tmp_path):
    p = tmp_path / "sub" / "runs.json"
    mr.record_run(_entry(), p)
    mr.record_run(_entry(quantization="fp8", tok_s_batch1=252.0), p)
    assert [r.as_dict() for r in mr.load_runs(p)] == [_entry(), _entry(quantization="fp8", tok_s_batch1=252.0)]
    mr.record_run(_entry(tok_s_batch1=285.5, date="2026-12-06 18:00"), p)  # same thing, same day: replaced
    runs = mr.load_runs(p)
    assert [(r.quantization, r.tok_s_batch1) for r in runs] == [("fp8", 252.0), ("fp8-block", 285.5)]
    mr.record_run(_entry(date="2026-12-07"), p)  # another day: a new run
    assert len(mr.load_runs(p)) == 3
    with pytest.raises(mr.RecordError):
        mr.record_run(_entry(bogus=1), p)
    assert len(mr.load_runs(p)) == 3


def test_record_run_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "runs.json"
    mr.record_run(_entry(), p)
    before = p.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        mr.record_run(_entry(quantization="fp8"), p)
    assert p.read_bytes() == before and sorted(x.name for x in tmp_path.iterdir()) == ["runs.json"]


def test_bench_record_helper_writes_valid_entries(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import record

    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_throughput.py", "--concurrency", "32,64", "--record"])
    e = record.entry("tiny-llama", torch.device("cpu"), torch.float32, concurrent={32: 100.0, 64: 150.0},
                     note="test")
    assert e["tok_s_64_concurrent"] == 150.0 and e["tok_s_concurrent"] == {"32": 100.0}
    assert e["precision"] == "fp32" and e["gpu"] == "cpu" and e["random_weights"] is True
    assert e["command"] == "python benchmarks/bench_throughput.py --concurrency 32,64 --record"
    assert e["commit"] is None or e["commit"][:7].isalnum()
    record.record(str(tmp_path / "r.json"), [e])
    assert mr.load_runs(tmp_path / "r.json")[0].as_dict() == e
    assert record.precision("fp8+head", torch.bfloat16) == "fp8" and record.precision(None, torch.bfloat16) == "bf16"
    assert mr.gpu_key("NVIDIA H100 80GB HBM3") == "h100-80gb" and mr.gpu_key("NVIDIA H200") == "h200-141gb"
    assert mr.gpu_key("NVIDIA A100-SXM4-40GB") == "a100-40gb"
    with pytest.raises(ValueError, match="not one giants knows"):
        mr.gpu_key("NVIDIA T4")
