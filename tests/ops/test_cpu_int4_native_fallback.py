"""The native CPU int4 GEMM's build never stops a user: a missing or failing compiler, an
unwritable cache, a CPU without AVX-512 and processes building at once all end on the
chunked paths (after one logged line where a build was tried) or on one complete library."""

import logging
import os
import stat
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import qalora_tune.ops._cpu_int4_native as native
from qalora_tune.ops import int4_linear, int4_linear_grad_input
from qalora_tune.ops._cpu_int4_chunked import chunked_int4_grad_input, chunked_int4_linear
from qalora_tune.quantization import quantize_rtn
from qalora_tune.quantization.int4_weight import to_torchao_int4
from tests.reference import seed_each_test  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh(monkeypatch):
    """The module as if nothing had been built or tried in this process, on a machine
    it runs on; restored afterwards."""
    monkeypatch.delenv("QALORA_TUNE_NATIVE_INT4", raising=False)
    monkeypatch.setattr(native, "_MACHINE_OK", True)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failed", False)
    yield


def _fake_compiler(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-c++"
    script.write_text("#!/bin/sh\n" + 'if [ "$1" = "--version" ]; then echo "fake-c++ 1.0"; exit 0; fi\n' + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def _int4(dtype=torch.float32):
    weight = to_torchao_int4(quantize_rtn(torch.randn(128, 256), 64), device="cpu", dtype=dtype)
    return weight.qdata, weight.scale_and_zero


def _assert_chunked_paths_run(qdata, scale_and_zero):
    # with the native GEMM out, the op's products are the chunked paths', bit for bit
    x, grad = torch.randn(5, 256), torch.randn(5, 128)
    assert torch.equal(int4_linear(x, qdata, scale_and_zero, 64, 128),
                       chunked_int4_linear(x, qdata, scale_and_zero, 64, 128))
    assert torch.equal(int4_linear_grad_input(grad, qdata, scale_and_zero, 64, 256),
                       chunked_int4_grad_input(grad, qdata, scale_and_zero, 64, 256))


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_a_failed_build_logs_one_line_and_the_chunked_paths_run(fresh, monkeypatch, tmp_path, caplog, compiler):
    if compiler == "missing":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    else:
        monkeypatch.setenv("CXX", str(_fake_compiler(tmp_path, 'echo "error: no AVX-512 here" >&2\nexit 1\n')))
    monkeypatch.setenv("QALORA_TUNE_CACHE_DIR", str(tmp_path / "cache"))
    qdata, scale_and_zero = _int4()
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.available()
        _assert_chunked_paths_run(qdata, scale_and_zero)
        assert not native.available()  # tried once
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "could not build its CPU int4 GEMM kernel" in lines[0], lines
    assert "\n" not in lines[0]
    if compiler == "failing":
        assert "no AVX-512 here" in lines[0]  # the compiler's first error line
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left behind


def test_an_unwritable_cache_falls_back_to_a_temp_dir_then_to_the_chunked_paths(fresh, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(_fake_compiler(tmp_path, textwrap.dedent('''\
        while [ $# -gt 1 ]; do if [ "$1" = "-o" ]; then out="$2"; fi; shift; done
        echo library > "$out"
    '''))))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.delenv("QALORA_TUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))  # cannot be created
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    built = native._build(os.environ["CXX"])
    assert built.parent == tmp_path / "tmp" / f"qalora_tune-{os.getuid()}"
    assert built.read_text() == "library\n"
    # a second call finds it without building again
    assert native._build(str(_fake_compiler(tmp_path, "exit 1\n"))) == built

    # no usable directory at all: one line, and the chunked paths
    monkeypatch.setenv("QALORA_TUNE_CACHE_DIR", str(blocker / "cache"))
    qdata, scale_and_zero = _int4()
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.available()
        _assert_chunked_paths_run(qdata, scale_and_zero)
    assert len(caplog.records) == 1 and "PermissionError" in caplog.records[0].getMessage()


def test_processes_building_at_once_leave_one_complete_library(fresh, monkeypatch, tmp_path):
    # a slow compiler that writes its output in two halves: a reader of a half-written
    # file would see only the first
    compiler = _fake_compiler(tmp_path, textwrap.dedent('''\
        while [ $# -gt 1 ]; do if [ "$1" = "-o" ]; then out="$2"; fi; shift; done
        printf first > "$out"; sleep 0.5; printf -- -second >> "$out"
    '''))
    monkeypatch.setenv("QALORA_TUNE_CACHE_DIR", str(tmp_path / "cache"))
    with ThreadPoolExecutor(4) as pool:
        targets = list(pool.map(lambda _: native._build(str(compiler)), range(4)))
    assert len(set(targets)) == 1
    assert targets[0].read_text() == "first-second"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [targets[0].name]  # no partial files


def test_the_build_key_follows_source_flags_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
    key = native._build_key("c++ 13")
    assert native._build_key("c++ 13") == key
    assert native._build_key("c++ 14") != key
    monkeypatch.setattr(native, "_FLAGS", native._FLAGS + ("-O2",))
    assert native._build_key("c++ 13") != key
    monkeypatch.setattr(native, "_FLAGS", native._FLAGS[:-1])
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx512f", "avx512bw", "avx512vl"})
    assert native._build_key("c++ 13") != key  # a cache shared with another CPU
    source = tmp_path / "kernel.cpp"
    source.write_bytes(native._SOURCE.read_bytes() + b"\n")
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
    monkeypatch.setattr(native, "_SOURCE", source)
    assert native._build_key("c++ 13") != key


def test_a_cpu_without_avx512_runs_the_chunked_paths_without_trying_a_build(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("QALORA_TUNE_NATIVE_INT4", raising=False)
    monkeypatch.setattr(native, "_MACHINE_OK", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failed", False)
    marker = tmp_path / "compiled"
    monkeypatch.setenv("CXX", str(_fake_compiler(tmp_path, f'touch "{marker}"; exit 1\n')))
    for dtype in (torch.float32, torch.bfloat16):
        qdata, scale_and_zero = _int4(dtype)
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            assert not native.supports(qdata, scale_and_zero)
        if dtype == torch.float32:
            _assert_chunked_paths_run(qdata, scale_and_zero)
    assert not marker.exists() and not caplog.records


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the native kernel is built on Linux only")
def test_a_user_without_a_compiler_sees_one_line_and_no_traceback(tmp_path):
    script = textwrap.dedent('''\
        import torch
        import qalora_tune.ops._cpu_int4_native as native
        from qalora_tune.ops import int4_linear
        from qalora_tune.quantization import quantize_rtn
        from qalora_tune.quantization.int4_weight import to_torchao_int4
        native._MACHINE_OK = True  # try the build whatever this CPU is
        w = to_torchao_int4(quantize_rtn(torch.randn(128, 256), 64), device="cpu", dtype=torch.float32)
        y = int4_linear(torch.randn(4, 256), w.qdata, w.scale_and_zero, 64, 128)
        y = int4_linear(torch.randn(4, 256), w.qdata, w.scale_and_zero, 64, 128)
        print("ok", tuple(y.shape))
    ''')
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), QALORA_TUNE_CACHE_DIR=str(tmp_path / "c"),
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("QALORA_TUNE_NATIVE_INT4", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok (4, 128)"
    ours = [line for line in done.stderr.splitlines() if "qalora-tune" in line or "Traceback" in line]
    assert len(ours) == 1 and "could not build its CPU int4 GEMM kernel" in ours[0], done.stderr
