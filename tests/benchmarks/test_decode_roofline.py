"""benchmarks/decode_roofline.py: a small run, the ratios it derives, and bad arguments."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import decode_roofline  # noqa: E402


def test_a_small_run_reports_rates_and_consistent_ratios(tmp_path):
    report = decode_roofline.main([
        "--dim-divisor", "4", "--layers", "1", "--stream-mib", "4", "--repeats", "2",
        "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"),
    ])
    m = report["measurement"]
    assert set(m["rows"]) == {"stream", "dense bf16", "int4 kernel", "int4_linear op",
                              "merged layer (F.linear)"}
    # widths / 4: 4 x 1024x1024 + 2 x 1024x2752 + 2752x1024, bf16 = 2 bytes a weight
    weights = 4 * 1024 * 1024 + 3 * 1024 * 2752
    assert m["rows"]["dense bf16"]["bytes"] == 2 * weights
    # int4: half a byte a weight, plus a bf16 scale and zero per group of 64
    assert m["rows"]["int4 kernel"]["bytes"] == weights // 2 + 4 * weights // 64
    assert m["bytes_ratio"] == pytest.approx(2 / (0.5 + 4 / 64))
    rows = m["rows"]
    assert m["measured_ratio_kernel"] == pytest.approx(rows["dense bf16"]["ms"] / rows["int4 kernel"]["ms"])
    assert m["measured_ratio_merged"] == pytest.approx(
        rows["dense bf16"]["ms"] / rows["merged layer (F.linear)"]["ms"])
    assert rows["stream"]["of_stream"] == pytest.approx(1.0)
    for row in rows.values():
        assert row["ms"] > 0 and row["gb_per_s"] == pytest.approx(row["bytes"] / row["ms"] / 1e6)
    assert json.loads((tmp_path / "r.json").read_text())["measurement"]["rows"].keys() == rows.keys()
    assert "| int4_linear op |" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("argv", [["--layers", "0"], ["--dim-divisor", "8"], ["--group-size", "48"]])
def test_bad_arguments_exit_with_a_usage_error(argv):
    with pytest.raises(SystemExit) as exit_info:
        decode_roofline.parse_args(argv)
    assert exit_info.value.code == 2
