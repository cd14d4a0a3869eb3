"""benchmarks/double_quant.py: the bits-per-weight count, and a short run on the real tiny model."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import double_quant  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared"


def test_llama2_7b_bits_follow_the_storage_formula():
    """Codes 4 bits; per group a scale and a zero in the dtype (plain), or an 8-bit code and
    a zero (8-bit scales) plus a float32 min and step per row; rows padded to 16."""
    rows = {(r["group_size"], r["dtype"]): r for r in double_quant.llama2_7b_bits([64, 128])}
    weights = sum(k * n for k, n in double_quant.LLAMA2_7B_LINEARS)
    rows_total = sum(n for _, n in double_quant.LLAMA2_7B_LINEARS)  # all multiples of 16
    for (group_size, dtype), row in rows.items():
        width = torch.finfo(getattr(torch, dtype)).bits
        assert row["plain_bits"] == pytest.approx(4 + 2 * width / group_size)
        expected = 4 + (8 + width) / group_size + 64 * rows_total / weights
        assert row["double_quant_bits"] == pytest.approx(expected)
        assert 0 < row["saved_fraction"] < 0.15
    assert rows[(64, "bfloat16")]["double_quant_bits"] == pytest.approx(4.388, abs=1e-3)


def test_int8_bases_are_refused():
    with pytest.raises(SystemExit):
        double_quant.parse_args(["--bits", "8"])


@pytest.mark.skipif(not (SHARED / "models" / "tinystories656K").is_dir(),
                    reason="needs ../shared/models/tinystories656K")
def test_a_short_run_reports_both_storages(tmp_path):
    report = double_quant.main([
        "--bits", "2", "--group-sizes", "32", "--quantizers", "rtn", "--tinystories-tokens", "512",
        "--json", str(tmp_path / "dq.json"), "--markdown", str(tmp_path / "dq.md"),
    ])
    (row,) = report["tinystories656K"]["rows"]
    # fp32 scales at G=32 on in_dim 128/384: 24 bits saved per group, 64 spent per row
    assert row["double_quant_bits"] < row["plain_bits"]
    # 8-bit scales move the weights a little: the error changes, by well under 1%
    assert row["double_quant_weight_sq_error"] != row["plain_weight_sq_error"]
    assert abs(row["weight_error_change"]) < 0.01
    assert abs(row["perplexity_change"]) < 0.05
    assert json.loads((tmp_path / "dq.json").read_text())["tinystories656K"]["rows"] == [row]
    assert "| 2 | 32 | rtn |" in (tmp_path / "dq.md").read_text()
