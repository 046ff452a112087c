"""The `remat` command line, through typer's CliRunner, on small models."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

import remat
from remat import Plan
from remat.tools import models
from remat.tools.cli import app

MLP = "remat:mlp?depth=6&width=64"
RESNET = ["torchvision:resnet18", "--batch", "2", "--input", "3x64x64"]
BENCH_KEYS = {
    "strategy", "peak_bytes", "activation_peak_bytes", "recompute_flops", "step_time_ratio", "predicted_time_ratio",
    "solve_seconds",
}

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ["plan", "bench", "report", "demo", "fit"]:
        assert command in result.stdout


def test_plan_prints_the_table_and_writes_json_and_the_plan(tmp_path):
    summary, saved = tmp_path / "summary.json", tmp_path / "plan.json"
    result = invoke("plan", MLP, "--json", str(summary), "--save", str(saved))
    assert result.exit_code == 0, result.output
    for row in ["kept activations", "baseline peak", "predicted peak", "peak cut", "recompute", "capture / solve"]:
        assert row in result.stdout
    data = json.loads(summary.read_text())
    assert data["model"] == MLP and data["batch"] == 1024 and data["fake"] is True
    assert data["predicted_peak_bytes"] == data["measured_peak_bytes"] <= data["baseline_peak_bytes"]
    assert data["kept"] == [data["stages"][i - 1] for i in data["checkpoints"]]
    assert 0 <= data["peak_cut"] < 1 and data["recompute_flops"] >= 0
    plan = Plan.load(saved)
    assert list(plan.checkpoints) == data["checkpoints"]
    assert data["budget_bytes"] is None and "none (least peak)" in result.stdout
    assert data["recompute_seconds"] is None and "recompute time" not in result.stdout
    assert data["predicted_slowdown"] == data["predicted_seconds"] / data["eager_seconds"] >= 1.0
    assert "step time (predicted)" in result.stdout and data["measured_slowdown"] is None


def test_plan_with_profiled_costs_reports_the_measured_recompute_time(tmp_path):
    summary = tmp_path / "summary.json"
    result = invoke("plan", MLP, "--costs", "profile", "--json", str(summary))
    assert result.exit_code == 0, result.output
    assert "recompute time (measured)" in result.stdout
    assert json.loads(summary.read_text())["recompute_seconds"] > 0


def test_plan_for_gradient_accumulation_says_so_and_predicts_that_step(tmp_path):
    summary = tmp_path / "summary.json"
    result = invoke("plan", MLP, "--grad-accumulation", "--json", str(summary))
    assert result.exit_code == 0, result.output
    assert "exist all step (accumulation)" in result.stdout
    data = json.loads(summary.read_text())
    assert data["grad_accumulation"] is True
    assert data["predicted_peak_bytes"] == data["measured_peak_bytes"]
    source = models.load(MLP)
    accumulating = remat.measure_step(source.model, source.example_inputs, fake=True, grad_accumulation=True)
    assert data["baseline_peak_bytes"] == accumulating.peak_bytes


def test_plan_within_a_budget_shows_it_and_keeps_to_it(tmp_path):
    source = models.load(MLP)
    least = remat.plan(source.model, source.example_inputs).predicted_peak_bytes
    budget = least + 200 * 2**10
    summary = tmp_path / "summary.json"
    result = invoke("plan", MLP, "--budget", str(budget), "--json", str(summary))
    assert result.exit_code == 0, result.output
    assert f"({budget} B)" in result.stdout
    data = json.loads(summary.read_text())
    assert data["budget_bytes"] == budget
    assert data["predicted_peak_bytes"] == data["measured_peak_bytes"] <= budget


def test_plan_compiled_predicts_its_measured_peak(tmp_path):
    summary = tmp_path / "summary.json"
    result = invoke("plan", *RESNET, "--compile", "aot_eager", "--real", "--json", str(summary))
    assert result.exit_code == 0, result.output
    assert "compiled" in result.stdout and "aot_eager" in result.stdout
    data = json.loads(summary.read_text())
    assert data["compiled"] == "aot_eager" and data["measured_slowdown"] > 0
    assert data["predicted_peak_bytes"] == data["measured_peak_bytes"] < data["baseline_peak_bytes"]
    bad = invoke("plan", MLP, "--compile", "tvm")
    assert bad.exit_code == 1 and "compile backend must be 'aot_eager' or 'inductor'" in bad.output


def test_plan_budget_below_the_least_peak_says_what_is_achievable():
    source = models.load(MLP)
    least = remat.plan(source.model, source.example_inputs).predicted_peak_bytes
    result = invoke("plan", MLP, "--budget", str(least - 1))
    assert result.exit_code == 1 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert "least achievable step peak is" in line and f"({least} B)" in line


def test_fit_finds_the_largest_batch_and_shows_the_next_does_not_fit():
    budget = 4 * 2**20
    result = invoke("fit", MLP, "--budget", "4MiB")
    assert result.exit_code == 0, result.output
    flat = re.sub(r"[\s│┃]+", " ", result.stdout)  # table cells may wrap
    batch = int(re.search(r"largest batch (\d+)", flat).group(1))
    source = models.load(MLP)
    fitting = remat.plan(source.model, source.make_inputs(batch), budget=budget)
    assert fitting.predicted_peak_bytes <= budget and f"({fitting.predicted_peak_bytes} B)" in flat
    least_next = remat.plan(source.model, source.make_inputs(batch + 1)).predicted_peak_bytes
    assert least_next > budget
    assert f"batch {batch + 1} does not fit: least peak" in flat and f"({least_next} B)" in flat


def test_fit_compiled_says_so_and_keeps_to_the_budget():
    result = invoke("fit", MLP, "--budget", "4MiB", "--compile", "aot_eager")
    assert result.exit_code == 0, result.output
    flat = re.sub(r"[\s│┃]+", " ", result.stdout)
    batch = int(re.search(r"largest batch (\d+)", flat).group(1))
    assert "compiled aot_eager" in flat and f"batch {batch + 1} does not fit" in flat


def test_bench_json_has_the_documented_schema(tmp_path):
    out = tmp_path / "bench.json"
    result = invoke("bench", *RESNET, "--strategies", "none,sqrt,per-block,remat", "--json", str(out))
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [r["strategy"] for r in rows] == ["none", "sqrt", "per-block", "remat"]
    assert all(set(r) == BENCH_KEYS for r in rows)
    by_name = {r["strategy"]: r for r in rows}
    none = by_name["none"]
    assert none["recompute_flops"] == 0 and none["solve_seconds"] == 0
    for r in rows:
        assert r["step_time_ratio"] is None  # fake tensors: no timing
        assert 0 < r["activation_peak_bytes"] <= r["peak_bytes"] <= none["peak_bytes"]
        assert r["recompute_flops"] >= 0 and r["solve_seconds"] >= 0
    assert by_name["remat"]["peak_bytes"] <= by_name["sqrt"]["peak_bytes"]
    assert "step time" in result.stdout


def test_bench_remat_at_a_budget_keeps_to_it(tmp_path):
    out = tmp_path / "bench.json"
    result = invoke("bench", *RESNET, "-s", "remat,remat@100MiB,remat@1GiB", "--json", str(out))
    assert result.exit_code == 0, result.output
    least, tight, roomy = json.loads(out.read_text())
    assert [least["strategy"], tight["strategy"], roomy["strategy"]] == ["remat", "remat@100MiB", "remat@1GiB"]
    assert least["peak_bytes"] <= tight["peak_bytes"] <= 100 * 2**20
    assert tight["recompute_flops"] <= least["recompute_flops"]
    assert roomy["recompute_flops"] == 0  # 1 GiB holds everything: nothing to recompute


def test_bench_real_times_the_steps(tmp_path):
    out = tmp_path / "bench.json"
    result = invoke("bench", "remat:mlp?depth=4&width=32&batch=64", "--real", "--steps", "2",
                    "-s", "remat", "--json", str(out))
    assert result.exit_code == 0, result.output
    [row] = json.loads(out.read_text())
    assert row["strategy"] == "remat" and row["step_time_ratio"] > 0 and row["predicted_time_ratio"] >= 1.0


def test_plan_real_shows_predicted_and_measured_step_time(tmp_path):
    summary = tmp_path / "summary.json"
    result = invoke("plan", "remat:mlp?depth=4&width=32&batch=64", "--real", "--json", str(summary))
    assert result.exit_code == 0, result.output
    assert "step time (predicted)" in result.stdout and "step time (measured)" in result.stdout
    data = json.loads(summary.read_text())
    assert data["measured_slowdown"] > 0 and data["predicted_slowdown"] >= 1.0


def test_report_writes_png_and_markdown(tmp_path):
    result = invoke("report", MLP, "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for png in [out / "memory.png", out / "pareto.png"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = (out / "report.md").read_text()
    assert "](memory.png)" in text and "](pareto.png)" in text and "predicted peak" in text
    source = models.load(MLP)
    front = remat.pareto(source.model, source.example_inputs)
    rows = re.findall(r"^\| [\d.]+ [KMG]iB \| [\d.]+% \| \d+ \|$", text, flags=re.MULTILINE)
    assert len(rows) == len(front) > 1  # one table row per plan of the front


def test_demo_runs_on_a_small_model():
    result = invoke("demo", "remat:mlp?depth=4&width=32", "--batch", "16")
    assert result.exit_code == 0, result.output
    assert "step peak" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["plan", "nope:model"], 1, "unknown model source"),
        (["plan", "torchvision:resnet18", "--input", "3xbig"], 1, "bad input shape"),
        (["plan", *RESNET[:3], "--input", "7x64x64"], 1, "running the model failed"),
        (["plan", MLP, "--budget", "lots"], 1, "budget must be"),
        (["plan", MLP, "--budget", "1KiB"], 1, "the least achievable step peak is"),
        (["plan", MLP, "--batch", "0"], 1, "batch_size must be a positive integer"),
        (["bench", MLP, "--strategies", "none,fast"], 1, "unknown strategy 'fast'"),
        (["bench", MLP, "--strategies", "remat@lots"], 1, "budget must be"),
        (["fit", MLP, "--budget", "1KiB"], 1, "the least achievable step peak is"),
        (["fit", MLP, "--budget", "-3GB"], 1, "budget must be"),
    ],
)
def test_errors_are_one_line(args, code, words):
    result = invoke(*args)
    assert result.exit_code == code
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
