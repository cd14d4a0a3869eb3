"""benchmarks/int4_matmul.py: a short CPU run, the path it reports, and bad arguments."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import int4_matmul  # noqa: E402


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_short_cpu_run_writes_every_method(tmp_path, dtype):
    report = int4_matmul.main([
        "--shapes", "256x128", "--rows", "1", "300", "--repeats", "1", "--warmup", "0",
        "--dtype", dtype, "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"),
    ])
    rows = report["results"]
    assert [(r["in_dim"], r["out_dim"], r["rows"]) for r in rows] == [(256, 128, 1), (256, 128, 300)]
    expected = {"dense", "dequant", "dequant_eager", "op", "grad_input", "grad_dequant", "grad_eager"}
    expected |= {"kernel"} if dtype == "bf16" else set()
    for row in rows:
        assert set(row["ms"]) == expected
        assert all(t > 0 for t in row["ms"].values())
        assert row["x_dense"]["dense"] == 1.0
    # a weight this small is built by the eager passes (below COMPILED_MIN_ELEMENTS)
    assert set(rows[0]["first_call_ms"]) == expected and "first_call_ms" not in rows[1]
    paths = [r["op_path"] for r in rows]
    # the native GEMM where it runs (fp32 always, bf16 from 16 rows), else the chunks
    fallback = "native" if int4_matmul.native_int4.available() else "dequant_eager"
    assert paths == (["kernel", fallback] if dtype == "bf16" else [fallback] * 2)
    assert json.loads((tmp_path / "r.json").read_text())["results"] == rows
    table = (tmp_path / "r.md").read_text()
    assert f"| 256 -> 128 | 300 | {paths[1]} |" in table
    assert "First call of each method" in table


def test_the_timed_methods_compute_the_same_product():
    from qalora_tune.quantization import quantize_rtn
    from qalora_tune.quantization.int4_weight import dequantize_int4, to_torchao_int4

    weight = to_torchao_int4(quantize_rtn(torch.randn(64, 256), 64), device="cpu", dtype=torch.bfloat16)
    dense = dequantize_int4(weight, torch.bfloat16)
    methods = int4_matmul.methods_for(weight, dense, 64, torch.bfloat16, torch.device("cpu"))
    x, grad = torch.randn(5, 256, dtype=torch.bfloat16), torch.randn(5, 64, dtype=torch.bfloat16)
    # all in bf16: equal up to a few roundings of the output's largest values
    want = x.double() @ dense.double().t()
    for name in ("dense", "kernel", "dequant", "dequant_eager", "op"):
        got = methods[name](x, grad).double()
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())
    want_grad = grad.double() @ dense.double()
    for name in ("grad_input", "grad_dequant", "grad_eager"):
        got_grad = methods[name](x, grad).double()
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=2e-2 * want_grad.abs().max().item())


@pytest.mark.parametrize("argv,message", [
    (["--shapes", "100x64"], "not a multiple of --group-size"),
    (["--rows", "0"], "--rows must be positive"),
    (["--shapes", "4096by64"], "expected IN_DIMxOUT_DIM"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        int4_matmul.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        int4_matmul.parse_args(["--device", "cuda"])
    assert "needs a CUDA GPU" in capsys.readouterr().err
