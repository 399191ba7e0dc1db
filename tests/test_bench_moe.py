"""Smoke test of ``benchmarks/bench_moe.py`` at toy shapes: it runs every experts x dispatch
configuration, records the path that ran, and ends with one JSON line of finite ratios.

No timing is asserted. ``--compile on`` is left out: inductor takes about a minute per
compile on a 2-core CPU even at these shapes (and the loop path recompiles in its first
steps), so only its argument check is tested here.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.script import load_script

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

TINY = [
    "--d-model",
    "16",
    "--n-head",
    "2",
    "--block-size",
    "8",
    "--batch",
    "2",
    "--vocab-size",
    "64",
    "--repeat",
    "1",
    "--warmup",
    "0",
    "--json-only",
]


@pytest.fixture
def bench(monkeypatch):
    """``bench_moe`` imported as the script runs (its ``from machine import ...`` needs the
    benchmarks folder on sys.path)."""
    return load_script(BENCHMARKS / "bench_moe.py", monkeypatch)


def run(bench, capsys, *argv: str) -> dict:
    assert bench.main(list(argv)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def check_configs(
    summary: dict, experts: list[int], dispatches: list[str], mfu: bool = False
) -> None:
    configs = summary["configs"]
    assert [(c["n_experts"], c["dispatch"], c["compile"]) for c in configs] == [
        (e, d, "off") for e in experts for d in dispatches
    ]
    for c in configs:
        assert "error" not in c, c
        assert c["dispatch_ran"] == c["dispatch"] == c["layer_dispatch_ran"]
        for key in ("ratio", "layer_ratio", "moe_tokens_per_s", "dense_tokens_per_s"):
            assert math.isfinite(c[key]) and c[key] > 0, (key, c)
        for key in ("peak_mem_mb", "moe_peak_mem_mb", "dense_peak_mem_mb"):
            assert c[key] is None, (key, c)  # CPU: no peak memory
        for key in ("moe_mfu", "dense_mfu"):  # only with --peak-tflops on CPU
            assert (c[key] > 0) if mfu else (c[key] is None), (key, c)
        assert c["moe_flops_per_token"] > c["dense_flops_per_token"] > 0


def test_synthetic_runs_every_experts_and_dispatch(bench, capsys):
    summary = run(bench, capsys, *TINY, "--experts", "2", "4")
    assert summary["mode"] == "synthetic"
    assert summary["shapes"]["device"] == "cpu" and not summary["shapes"]["bf16"]
    check_configs(summary, [2, 4], ["loop", "grouped"])


def test_real_shape_scaled_down(bench, capsys):
    """--real-shape with shape overrides: bf16 autocast, the MoE blocks given, dense twin."""
    summary = run(
        bench,
        capsys,
        "--real-shape",
        *TINY,
        "--n-layer",
        "3",
        "--moe-layer",
        "1",
        "2",
        "--experts",
        "4",
        "--peak-tflops",
        "1",
    )
    assert summary["mode"] == "real-shape"
    shapes = summary["shapes"]
    assert shapes["bf16"] and shapes["moe_layers"] == [1, 2] and shapes["n_positions"] == 1024
    check_configs(summary, [4], ["loop", "grouped"], mfu=True)
    assert all(c["peak_tflops"] == 1 for c in summary["configs"])


def test_table_names_each_configuration(bench, capsys):
    assert bench.main([*TINY[:-1], "--experts", "2", "--dispatch", "auto"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.split()[:3] == ["2", "auto", "off"] for line in out)
    assert "(ran: loop)" in "\n".join(out)  # auto runs the loop on CPU
    assert json.loads(out[-1])["configs"][0]["dispatch_ran"] == "loop"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--dispatch", "grouped", "--d-model", "12", "--n-head", "2"], "--d-model 16"),
        (
            ["--compile", "on", "--dispatch", "grouped", "--d-model", "16", "--n-head", "2"],
            "--bf16",
        ),
        (["--moe-layer", "2", "--n-layer", "2"], "--moe-layer"),
        (["--block-size", "16", "--n-positions", "8"], "--n-positions"),
        (["--experts", "2", "--top-k", "3"], "--top-k"),
    ],
)
def test_bad_arguments_name_the_fix(bench, capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])
    assert "--device cpu" in capsys.readouterr().err


def test_compile_defaults_off_on_cpu(bench):
    assert bench.parse_args([]).compile == ["off"]
    assert bench.parse_args(["--real-shape"]).bf16


def test_flops_per_token_is_the_palm_estimate(bench):
    from moe_emergence.model.gpt2_moe import build_gpt2, install_moe_layers

    dense = build_gpt2(
        pretrained=None, vocab_size=64, n_positions=8, n_embd=16, n_layer=2, n_head=2
    )
    n = sum(p.numel() for p in dense.parameters()) - dense.transformer.wpe.weight.numel()
    assert bench.flops_per_token(dense, 8) == 6 * n + 12 * 2 * 16 * 8
    install_moe_layers(dense, [1], 4, top_k=1)  # top-1: one expert and the router active
    router = 16 * 4
    assert bench.flops_per_token(dense, 8) == 6 * (n + router) + 12 * 2 * 16 * 8


def test_a_failed_configuration_is_reported_and_exits_1(bench, capsys, monkeypatch):
    real = bench.run_config

    def run_config(args, n_experts, dispatch, compiled):
        if dispatch == "grouped":
            raise RuntimeError("no grouped GEMM here\nsecond line")
        return real(args, n_experts, dispatch, compiled)

    monkeypatch.setattr(bench, "run_config", run_config)
    assert bench.main([*TINY, "--experts", "2"]) == 1
    captured = capsys.readouterr()
    configs = json.loads(captured.out.strip().splitlines()[-1])["configs"]
    assert [c.get("error") for c in configs] == [None, "RuntimeError: no grouped GEMM here"]
    assert "Traceback" in captured.err


def test_gpu_check_script_parses_and_its_benchmark_flags_exist(bench, monkeypatch):
    """gpu_check.sh is the one prepared GPU command: its shell parses and every bench_moe call
    in it takes its flags (parsed as on a CUDA machine)."""
    script = BENCHMARKS / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text().replace("\\\n", " ")
    calls = [
        shlex.split(line.split("bench_moe.py", 1)[1].split(">")[0])
        for line in text.splitlines()
        if "benchmarks/bench_moe.py" in line and not line.lstrip().startswith("#")
    ]
    assert len(calls) == 3
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    for argv in calls:
        assert bench.parse_args(argv).device == "cuda"
