"""benchmarks/_report.py: the recorded command and the written outputs."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _report  # noqa: E402


def test_the_command_line_carries_the_switches_that_select_code_paths(monkeypatch):
    monkeypatch.setattr(_report, "_ENVIRONMENT_AT_START", {"PATH": "/bin"})
    assert _report.command_line("benchmarks/x.py", ["--a", "1"]) == "python benchmarks/x.py --a 1"
    monkeypatch.setattr(_report, "_ENVIRONMENT_AT_START", {
        "QALORA_TUNE_EAGER_DEQUANTIZE": "1", "UNRELATED": "1", "TORCHINDUCTOR_CACHE_DIR": "/tmp/c",
    })
    assert _report.command_line("benchmarks/x.py", []) == (
        "QALORA_TUNE_EAGER_DEQUANTIZE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/c python benchmarks/x.py"
    )


def test_the_command_line_quotes_arguments_a_shell_would_split():
    line = _report.command_line("benchmarks/x.py", ["--cases", "tiny w512 G64 b2 r8", "--b", "it's"])
    assert line.startswith("python benchmarks/x.py --cases 'tiny w512 G64 b2 r8' --b ")
    import shlex

    assert shlex.split(line) == ["python", "benchmarks/x.py", "--cases", "tiny w512 G64 b2 r8",
                                 "--b", "it's"]


def test_the_command_line_ignores_what_inductor_sets_after_start(monkeypatch):
    monkeypatch.setattr(_report, "_ENVIRONMENT_AT_START", {})
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_user")  # as inductor does
    assert _report.command_line("benchmarks/x.py", []) == "python benchmarks/x.py"


def test_outputs_are_written_with_their_folders(tmp_path):
    _report.write_outputs(tmp_path / "a" / "r.json", tmp_path / "b" / "r.md", {"x": 1}, "| t |\n")
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"x": 1}
    assert (tmp_path / "b" / "r.md").read_text() == "| t |\n"
    _report.write_outputs(None, None, {"x": 2}, "")  # nothing asked, nothing written
