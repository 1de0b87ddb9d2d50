"""`giants fit MODEL`: the `giants serve` line it proposes (tensor parallel size, or a layer placement when no
size fits the machine's GPUs), checked against the memory numbers and parsed by serve's own argument parser."""

from __future__ import annotations

import json
import shlex

import pytest

from giants.analysis.hardware import get_gpu
from giants.analysis.memory import serving_memory, weight_bytes
from giants.analysis.serve_plan import GiB, max_memory_arg, propose, serve_options
from giants.cli import build_parser, main
from giants.inference.placement import parse_size
from giants.parallel.layout import check_tp
from giants.presets import get_config

H100 = get_gpu("h100-80gb")


def _fit(capsys, *argv: str) -> dict:
    code = main(["fit", *argv, "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _serve_args(command: str):
    """The proposed line through `giants serve`'s real parser (what running it would accept)."""
    argv = shlex.split(command)
    assert argv[:2] == ["giants", "serve"]
    return build_parser().parse_args(argv[1:])


def test_llama_3_70b_needs_tp_2_on_80gb(capsys):
    r = _fit(capsys, "llama-3-70b", "--gpu", "h100-80gb")
    plan = r["serve"]
    assert plan["kind"] == "tp" and plan["tensor_parallel_size"] == 2
    cfg = get_config("llama-3-70b")
    one = serving_memory(cfg, 8192, 1, "bf16", tp=1)
    two = serving_memory(cfg, 8192, 1, "bf16", tp=2)
    assert one.total > 80e9 >= two.total  # 141 GB of weights alone do not fit one card; half of them do
    assert two.weights == weight_bytes(cfg, "bf16") // 2 and 70e9 < two.weights < 71e9
    args = _serve_args(plan["command"])
    assert args.model == "llama-3-70b" and args.tensor_parallel_size == 2 and args.device_map is None
    assert args.max_model_len == 8192 and args.dtype == "bfloat16"


def test_mixtral_8x22b_needs_tp_4_and_a_placement_on_two_gpus(capsys):
    plan = _fit(capsys, "mixtral-8x22b")["serve"]
    assert plan["kind"] == "tp" and plan["tensor_parallel_size"] == 4  # 281 GB of bf16: 70 GB per GPU
    r = _fit(capsys, "mixtral-8x22b", "--num-gpus", "2")
    plan = r["serve"]
    assert r["fits_tensor_parallel"] is False and plan["kind"] == "device_map"
    args = _serve_args(plan["command"])
    assert args.device_map == "auto" and set(args.max_memory) == {0, 1, "cpu"}
    budgets = {k: parse_size(v) for k, v in args.max_memory.items()}
    weights = weight_bytes(get_config("mixtral-8x22b"), "bf16")
    assert budgets[0] + budgets[1] < weights <= budgets[0] + budgets[1] + budgets["cpu"]
    assert budgets[0] <= 0.9 * 80e9 and plan["blocks_streamed"] > 0 and plan["blocks_on_gpus"] > 0
    assert 0 < plan["decode_batch1_tokens_per_s"] < 1  # ~160 GB over PCIe per token


def test_llama_3_70b_on_one_gpu_streams_about_half_its_blocks(capsys):
    plan = _fit(capsys, "llama-3-70b", "--num-gpus", "1")["serve"]
    assert plan["kind"] == "device_map" and plan["blocks_on_gpus"] + plan["blocks_streamed"] == 80
    assert 30 <= plan["blocks_on_gpus"] <= 40  # ~62 GiB of 1.7 GB blocks, two slots kept free
    # 0.63 tok/s measured by benchmarks/bench_offload.py on an H100 with the default budget; the roofline bounds it
    assert 0.6 < plan["decode_batch1_tokens_per_s"] < 0.8
    assert _serve_args(plan["command"]).max_memory[0].endswith("GiB")


def test_gpt_oss_120b_fits_one_gpu_in_mxfp4():
    cfg = get_config("gpt-oss-120b")
    plan = propose(cfg, "gpt-oss-120b", H100, 8, 8192, 1, "mxfp4")
    assert plan.kind == "tp" and plan.tp == 1 and plan.memory.total <= 80e9
    assert "--quantization mxfp4" in plan.command
    bf16 = propose(cfg, "gpt-oss-120b", H100, 8, 8192, 1, "bf16")
    assert bf16.kind == "tp" and bf16.tp == 4  # 233 GB of bf16


def test_fit_proposes_what_serve_can_run(capsys):
    """--dtype mxfp4 proposes --quantization only if `giants serve` has that flag; otherwise it plans bf16."""
    r = _fit(capsys, "gpt-oss-120b", "--dtype", "mxfp4")
    assert r["gpus"] == 1  # the analysis table itself is unchanged
    args = _serve_args(r["serve"]["command"])
    if "--quantization" in serve_options():
        assert r["serve"]["tensor_parallel_size"] == 1 and args.quantization == "mxfp4"
    else:
        assert r["serve"]["tensor_parallel_size"] == 4 and args.dtype == "bfloat16"


def test_fit_fp8_proposes_serve_fp8_on_one_gpu_else_bf16(capsys):
    """giants serve runs FP8 weights on one GPU: Llama-3-70B in fp8 fits one H100 and is proposed as such;
    Mixtral-8x22B in fp8 needs two, where serve has no FP8, so the line plans bf16 (the JSON says why)."""
    r = _fit(capsys, "llama-3-70b", "--dtype", "fp8")
    args = _serve_args(r["serve"]["command"])
    assert r["serve"]["tensor_parallel_size"] == 1 and args.quantization == "fp8"
    r = _fit(capsys, "mixtral-8x22b", "--dtype", "fp8", "--gpu", "h200-141gb")
    args = _serve_args(r["serve"]["command"])
    assert args.quantization is None and args.dtype == "bfloat16" and r["serve"]["tensor_parallel_size"] > 1


def test_proposed_tp_passes_serve_checks_and_is_the_smallest():
    for name in ("llama-3-70b", "mixtral-8x22b", "gemma-2-27b", "gpt-oss-120b", "llama-3.1-8b"):
        cfg = get_config(name)
        plan = propose(cfg, name, H100, 8, 4096)
        check_tp(cfg, plan.tp, replicate_kv=True)
        for smaller in (1, 2, 4):
            if smaller < plan.tp:
                assert serving_memory(cfg, 4096, 1, tp=smaller).total > 80e9 or smaller in plan.skipped


def test_tp_sizes_serve_refuses_are_skipped_with_the_reason():
    cfg = get_config("llama-3-70b").replace(ffn_dim=28670)  # divisible by 2, not by 4 or 8
    plan = propose(cfg, "llama-3-70b", get_gpu("a100-40gb"), 8, 8192)  # TP 2 is 70 GB per 40 GB card
    assert set(plan.skipped) == {4, 8} and all("ffn_dim=28670" in why for why in plan.skipped.values())
    assert plan.kind == "device_map" and "--max-memory 0=" in plan.command


def test_max_memory_arg_round_trips():
    line = max_memory_arg({"cuda:0": 62 * GiB, "cuda:1": 63 * GiB + 5, "cpu": 200 * GiB})
    assert line == "0=62GiB,1=63GiB,cpu=200GiB"
    args = build_parser().parse_args(["serve", "m", "--device-map", "auto", "--max-memory", line])
    assert args.max_memory == {0: "62GiB", 1: "63GiB", "cpu": "200GiB"}


@pytest.mark.parametrize("bad", ["0:62GiB", "cpu=lots", "mps=1GiB"])
def test_serve_refuses_a_bad_max_memory(bad, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--device-map", "auto", "--max-memory", bad])
    assert "--max-memory" in capsys.readouterr().err


def test_serve_device_map_json_and_refusals(capsys):
    args = build_parser().parse_args(["serve", "m", "--device-map", '{"": "cpu", "layers.1": "disk"}'])
    assert args.device_map == {"": "cpu", "layers.1": "disk"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--device-map", "everywhere"])
    assert "--device-map" in capsys.readouterr().err
