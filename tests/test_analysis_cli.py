"""`giants compare`, `giants fit`, `giants report` through giants.cli.main, including bad input."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from giants.analysis.claims import check_claims
from giants.analysis.flops import forward_flops_per_token
from giants.analysis.memory import WEIGHT_FORMATS, kv_cache_bytes, weight_bytes
from giants.analysis.params import count_params
from giants.cli import main
from giants.presets import ARTICLE_PRESETS, get_config

COMPARE_KEYS = {"preset", "params_total", "params_active", "params_active_with_embedding", "params_embedding",
                "flops_per_token_forward", "kv_cache_bytes", "weights_bytes"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_default_json(capsys):
    code, out, err = run(capsys, "compare", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["preset"] for r in rows] == list(ARTICLE_PRESETS)
    for r in rows:
        assert COMPARE_KEYS <= set(r)
        cfg = get_config(r["preset"])
        pc = count_params(cfg)
        assert (r["params_total"], r["params_active"], r["params_active_with_embedding"], r["params_embedding"]) == (
            pc.total, pc.active, pc.active_with_embedding, pc.embedding)
        assert r["flops_per_token_forward"] == forward_flops_per_token(cfg, 8192).total
        assert r["kv_cache_bytes"] == kv_cache_bytes(cfg, 8192, 1, "bf16")
        assert r["weights_bytes"] == {f: weight_bytes(cfg, f) for f in WEIGHT_FORMATS}


def test_compare_options_and_formats(capsys, tmp_path):
    code, out, _ = run(capsys, "compare", "gpt-oss-20b", "--context", "4096", "--dtype", "fp8", "--format", "json")
    r = json.loads(out)[0]
    assert code == 0 and r["kv_cache_bytes"] == kv_cache_bytes(get_config("gpt-oss-20b"), 4096, 1, "fp8")
    code, out, _ = run(capsys, "compare", "llama-3.1-8b", "gemma-2-2b", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["preset"] for r in rows] == ["llama-3.1-8b", "gemma-2-2b"]
    assert int(rows[0]["weights_bytes.bf16"]) == 16_060_522_496
    code, out, _ = run(capsys, "compare", "mixtral-8x7b", "--format", "md")
    assert code == 0 and out.startswith("### ") and "| mixtral-8x7b |" in out
    code, out, _ = run(capsys, "compare")
    assert code == 0 and "gpt-oss-120b-described" in out and "116.83B" in out


def test_compare_reads_hf_config_json(capsys, tmp_path):
    path = tmp_path / "my-llama" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(get_config("llama-3.2-1b").to_hf()))
    code, out, err = run(capsys, "compare", str(path), "llama-3.2-1b", "--format", "json")
    assert code == 0, err
    a, b = json.loads(out)
    assert a["preset"] == "my-llama" and {k: a[k] for k in COMPARE_KEYS - {"preset"}} == {
        k: b[k] for k in COMPARE_KEYS - {"preset"}}


def test_a_model_folder_reads_its_config_json(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "my-mixtral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(get_config("mixtral-8x7b").to_hf()))
    code, out, err = run(capsys, "compare", str(folder), "--format", "json")
    assert code == 0, err
    r = json.loads(out)[0]
    assert r["preset"] == "my-mixtral" and r["params_total"] == count_params(get_config("mixtral-8x7b")).total
    monkeypatch.chdir(folder)
    code, out, err = run(capsys, "fit", ".", "--format", "json")
    assert code == 0 and json.loads(out)["model"] == "my-mixtral", err
    (tmp_path / "gemma-2-2b").mkdir()  # a folder named like a preset does not shadow the preset
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "compare", "gemma-2-2b", "--format", "json")
    assert code == 0 and json.loads(out)[0]["source"].startswith("google/gemma-2-2b"), err
    code, _, err = run(capsys, "compare", str(tmp_path))
    assert code == 2
    _clean_error(err, "has no config.json")


def test_fit_json(capsys):
    code, out, err = run(capsys, "fit", "gpt-oss-120b", "--gpu", "h100-80gb", "--dtype", "mxfp4", "--context",
                         "131072", "--format", "json")
    assert code == 0, err
    r = json.loads(out)
    assert r["gpus"] == 1 and r["memory_per_gpu_bytes"] <= 80e9
    assert r["memory_per_gpu_bytes"] == sum(r["memory_per_gpu"][k] for k in ("weights", "kv_cache", "workspace"))
    code, out, _ = run(capsys, "fit", "llama-3-70b", "--format", "json")
    r = json.loads(out)
    assert r["gpus"] == 2 and r["layout"].startswith("TP=2") and r["decode_tokens_per_s"] > 0
    code, out, _ = run(capsys, "fit", "llama-3-70b", "--gpu", "a100-40gb", "--batch", "8")
    assert code == 0 and "A100 40GB" in out and "KV cache" in out


def test_fit_budget(capsys):
    code, out, err = run(capsys, "fit", "--budget", "2x a100-80gb", "--format", "json")
    assert code == 0, err
    r = json.loads(out)
    assert r["budget"] == {"gpus": 2, "gpu": "a100-80gb"}
    by = {m["preset"]: m for m in r["models"]}
    assert by["gemma-2-27b"]["fits"] and by["gemma-2-27b"]["dtype"] == "bf16" and by["gemma-2-27b"]["gpus"] == 1
    assert by["llama-3-70b"]["fits"] and by["llama-3-70b"]["gpus"] == 2
    assert by["mixtral-8x22b"]["dtype"] != "bf16"  # 281 GB of bf16 cannot fit 160 GB
    assert by["gpt-oss-120b"]["dtype"] == "mxfp4" and by["gpt-oss-120b"]["gpus"] == 1  # as published
    assert all(m["gpus"] <= 2 for m in r["models"] if m["fits"])
    code, out, _ = run(capsys, "fit", "--budget", "1x rtx-4090-24gb", "--dtype", "bf16", "--format", "json")
    by = {m["preset"]: m for m in json.loads(out)["models"]}
    assert not by["gpt-oss-120b"]["fits"] and "why_not" in by["gpt-oss-120b"]
    code, out, _ = run(capsys, "fit", "--budget", "2x a100-80gb")
    assert code == 0 and "which models fit 2 x A100 80GB" in out


def test_fit_train(capsys):
    code, out, err = run(capsys, "fit", "llama-3.1-8b", "--train", "--tokens", "15e12", "--format", "json")
    assert code == 0, err
    r = json.loads(out)
    assert r["fits"] and r["memory_per_gpu_bytes"] <= 80e9 and r["gpu_days"] > 0 and r["gpus"] == r["dp"]
    code, out, err = run(capsys, "fit", "llama-3.1-8b", "--train", "--dp", "1", "--zero", "0", "--format", "json")
    assert not json.loads(out)["fits"]  # 16 bytes x 8B params alone exceed 80 GB
    assert code == 2 and "does not fit" in err  # as serving a model that does not fit


# ---- bad input -----------------------------------------------------------------------------------

def _clean_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_unknown_preset_suggests(capsys):
    code, _, err = run(capsys, "compare", "llama-3-7b")
    assert code == 2
    _clean_error(err, "unknown preset 'llama-3-7b'", "did you mean", "llama-3-70b")
    code, _, err = run(capsys, "fit", "gpt-oss-12b")
    assert code == 2
    _clean_error(err, "did you mean", "gpt-oss-120b")


def test_unknown_gpu_lists_known(capsys):
    code, _, err = run(capsys, "fit", "gemma-2-2b", "--gpu", "b200")
    assert code == 2
    _clean_error(err, "unknown GPU 'b200'", "h100-80gb", "mi300x-192gb", "rtx-4090-24gb")
    code, _, err = run(capsys, "fit", "--budget", "2x v100")
    assert code == 2
    _clean_error(err, "unknown GPU 'v100'")


def test_config_with_missing_fields(capsys, tmp_path):
    hf = get_config("llama-3.2-1b").to_hf()
    del hf["intermediate_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    code, _, err = run(capsys, "compare", str(path))
    assert code == 2
    _clean_error(err, str(path), "intermediate_size")
    (tmp_path / "g.json").write_text(json.dumps({"vocab_size": 10, "d_model": 8}))
    code, _, err = run(capsys, "fit", str(tmp_path / "g.json"))
    assert code == 2
    _clean_error(err, "missing required fields", "n_layers")
    code, _, err = run(capsys, "compare", str(tmp_path / "nope.json"))
    assert code == 2
    _clean_error(err, "not found", "nope.json")


def test_fit_beyond_one_node(capsys):
    code, _, err = run(capsys, "fit", "mixtral-8x22b", "--gpu", "rtx-4090-24gb")
    assert code == 2
    _clean_error(err, "does not fit one node", "RTX 4090", "--dtype int4")
    m = re.search(r"at least (\d+) x", err)
    assert m and int(m.group(1)) > 8
    code, _, err = run(capsys, "fit", "gemma-2-27b", "--context", "100000")
    assert code == 2
    _clean_error(err, "max_context 8192")
    code, _, err = run(capsys, "fit", "gemma-2-27b", "--dtype", "int3")
    assert code == 2
    _clean_error(err, "int3", "mxfp4")
    code, _, err = run(capsys, "fit")
    assert code == 2
    _clean_error(err, "--budget")
    code, out, err = run(capsys, "fit", "--budget", "16x rtx-4090", "--dtype", "bf16", "--format", "json")
    assert code == 0, err
    by = {m["preset"]: m for m in json.loads(out)["models"]}
    assert not by["mixtral-8x22b"]["fits"] and "the limit is 8 (" in by["mixtral-8x22b"]["why_not"]
    assert all(m["gpus"] <= 8 for m in by.values() if m["fits"])


# ---- report --------------------------------------------------------------------------------------

def test_report_renders(capsys, tmp_path, monkeypatch):
    out = tmp_path / "report"
    figures = _spy_on_figures(monkeypatch)
    code, stdout, err = run(capsys, "report", "--out", str(out))
    assert code == 0, err
    assert "index.html" in stdout
    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    plots = re.findall(r'data-file="([^"]+)"', page)
    assert set(plots) == {"params.png", "kv_cache.png", "serving_memory.png", "decode_roofline.png", "gpu_fit.png"}
    for name in plots:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert set(figures) == set(plots)
    _check_figures_legible(figures)
    assert page.count('src="data:image/png;base64,') == len(plots)  # self-contained
    assert "http://" not in page and "https://" not in page
    # the claims table: one row per claim, each with a verdict cell
    table = page.split('<table class="claims">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr><td>.*?</tr>", table)
    claims = check_claims()
    assert len(rows) == len(claims)
    for row, claim in zip(rows, claims):
        assert claim.claim.replace('"', "&quot;") in row
        assert f'class="verdict-{claim.verdict}">{claim.verdict}</td>' in row
    md = (out / "report.md").read_text()
    for name in plots:
        assert f"]({name})" in md
    for claim in claims:
        assert f"| {claim.verdict} |" in md



def _spy_on_figures(monkeypatch) -> dict:
    """Record the visible axes of every figure saved (drawn first, so tick labels are final)."""
    import matplotlib.figure

    seen: dict = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def spy(fig, path, *a, **k):
        fig.canvas.draw()
        seen[Path(path).name] = [ax for ax in fig.axes if ax.get_visible()]
        return real_savefig(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return seen


def _check_figures_legible(seen: dict) -> None:
    """Every visible panel has a title, axis labels (one y label may serve a row of sharey panels) and
    data; legends are not tiny; log axes read as plain numbers (no '4x10^2' tick labels)."""
    for name, axes in seen.items():
        assert axes, name
        for ax in axes:
            assert ax.get_title() and ax.get_xlabel(), (name, ax.get_title())
            assert any(a.get_ylabel() for a in ax.get_shared_y_axes().get_siblings(ax)), (name, ax.get_title())
            assert ax.lines or ax.patches or ax.images, (name, ax.get_title())
            legend = ax.get_legend()
            if legend is not None:
                assert all(t.get_fontsize() >= 7 for t in legend.get_texts()), name
            for label in ax.get_yticklabels() + ax.get_xticklabels():
                assert "times" not in label.get_text() and "^" not in label.get_text(), (name, label.get_text())
