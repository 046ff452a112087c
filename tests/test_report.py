"""Tests of the plain-text report helpers and the demo."""

import re

import pytest

from remat import demo
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


def test_demo_prints_the_measurement(capsys):
    demo.main(["remat:mlp?depth=2&width=64", "--batch", "16", "--real"])
    out = capsys.readouterr().out
    assert "remat:mlp?depth=2&width=64" in out
    # activations 16 x 64 x 4 B = 4 KiB, weights 64 x 64 x 4 B = 16 KiB each
    assert re.search(r"^parameters +32\.0 KiB$", out, re.M)
    assert "real (CPU)" in out


def test_demo_rejects_bad_spec(capsys):
    with pytest.raises(SystemExit):
        demo.main(["nonsense"])
    assert "has no scheme" in capsys.readouterr().err
