"""benchmarks/gpu_check.sh: its dry run (every step on CPU with tiny shapes) passes, so no
device minute is spent on a typo; bad arguments stop it with one line; the wheels it
carries are the versions this project runs."""

import json
import os
import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(*args, cwd=REPO, timeout=60):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_bad_arguments_and_the_wrong_directory_stop_it_with_one_line(tmp_path):
    done = _run("--dry-rnu")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "gpu_check: unknown argument --dry-rnu (use --dry-run, --fetch-wheels, --out DIR, --wheels DIR)"]
    done = _run("--dry-run", cwd=tmp_path)
    assert done.returncode == 2 and "repository root" in done.stderr and not list(tmp_path.iterdir())


def test_the_steps_limits_on_the_gpu_add_up_to_less_than_8_minutes():
    text = SCRIPT.read_text()
    gpu_part = text.split('if [ "$MODE" = dry ]; then\n    run install')[1].split("\nelse\n")[1]
    limits = dict(re.findall(r"^\s*run (\w+) (\d+) ", gpu_part, flags=re.M))
    assert set(limits) == {"install", "environment", "tests_cuda", "train_cuda", "train_1b_cuda", "decode_cuda"}
    assert sum(map(int, limits.values())) <= 470  # and a few seconds for the summary


def test_the_carried_wheels_are_the_versions_installed_here():
    pinned = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s)]*)",
                             SCRIPT.read_text().split("PINNED_WHEELS=(")[1].split(")")[0]))
    assert {"torchao", "torchtune"} <= set(pinned)
    for name, pinned_version in pinned.items():
        assert version(name) == pinned_version, name


@pytest.mark.heavy
def test_the_dry_run_runs_every_step_and_writes_the_results(tmp_path):
    out = tmp_path / "results"
    done = _run("--dry-run", "--out", str(out), timeout=3000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "gpu_check_cuda.json").read_text())
    assert summary["mode"] == "dry"
    assert [s["step"] for s in summary["steps"]] == [
        "install", "tests_cuda", "train_cuda", "train_1b_cuda", "decode_cuda"]
    assert all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    for name in ("train_cuda", "train_1b_cuda", "decode_cuda"):
        assert json.loads((out / f"{name}.json").read_text())["results"]
        assert (out / f"{name}.md").read_text().strip()
    checks = {c["check"]: c for c in summary["checks"]}
    assert checks["train_cuda: qalora_bf16 / qlora_bf16"]["measured"] > 0
    assert "| train_cuda | ok |" in (out / "gpu_check_cuda.md").read_text()
