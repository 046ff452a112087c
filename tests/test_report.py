"""Tests of the plain-text report helpers and the demo."""

import re

import pytest

import remat
from remat.tools import demo, models
from remat.report import format_bytes, format_table


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (5 * 2**20 + 8, "5.0 MiB"), (3 * 2**29, "1.50 GiB")],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_format_table_aligns_columns():
    table = format_table([("peak", "2.00 GiB", "-40 %"), ("time", "0.5 s", "")], ["", "baseline", "cut"])
    assert table.splitlines() == [
        "      baseline    cut",
        "----  --------  -----",
        "peak  2.00 GiB  -40 %",
        "time     0.5 s       ",
    ]


def test_format_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="2 cells for 3 headers"):
        format_table([("a", 1)], ["x", "y", "z"])


def test_demo_prints_baseline_and_plan(capsys):
    spec = "remat:mlp?depth=8&width=64"
    demo.main([spec, "--batch", "256", "--real"])
    out = capsys.readouterr().out
    assert spec in out and "real CPU" in out
    source = models.load(spec, 256)
    optimized = remat.optimize(source.model, source.example_inputs)
    before = remat.measure_step(source.model, source.example_inputs)
    after = remat.measure_step(optimized, source.example_inputs)
    assert after.peak_bytes < before.peak_bytes
    row = rf"^step peak +{re.escape(format_bytes(before.peak_bytes))} +{re.escape(format_bytes(after.peak_bytes))} "
    assert re.search(row, out, re.M), out


def test_demo_rejects_bad_spec(capsys):
    with pytest.raises(SystemExit):
        demo.main(["nonsense"])
    assert "has no scheme" in capsys.readouterr().err
