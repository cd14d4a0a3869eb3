"""benchmarks/_report.py: the recorded command and the written outputs."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _report  # noqa: E402


def test_the_command_line_carries_the_switches_that_select_code_paths(monkeypatch):
    monkeypatch.delenv("QALORA_TUNE_EAGER_DEQUANTIZE", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert _report.command_line("benchmarks/x.py", ["--a", "1"]) == "python benchmarks/x.py --a 1"
    monkeypatch.setenv("QALORA_TUNE_EAGER_DEQUANTIZE", "1")
    monkeypatch.setenv("UNRELATED", "1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/cache")
    assert _report.command_line("benchmarks/x.py", []) == (
        "QALORA_TUNE_EAGER_DEQUANTIZE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/cache python benchmarks/x.py"
    )


def test_outputs_are_written_with_their_folders(tmp_path):
    _report.write_outputs(tmp_path / "a" / "r.json", tmp_path / "b" / "r.md", {"x": 1}, "| t |\n")
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"x": 1}
    assert (tmp_path / "b" / "r.md").read_text() == "| t |\n"
    _report.write_outputs(None, None, {"x": 2}, "")  # nothing asked, nothing written
