"""``qalora-tune export-task`` and ``qalora-tune task-info``."""

import json

from qalora_tune._cli import main
from qalora_tune.tasks import read_task_package
from tests.tasks.family import make_family


def test_export_task_and_task_info(tmp_path, capsys):
    family = make_family(tmp_path, 4, 32, 1)
    other = make_family(tmp_path / "other", 4, 32, 1, seed=5)
    task = tmp_path / "tasks" / "shakespeare"
    assert main(["export-task", str(family.merged[0]), str(task), "--base", str(family.base)]) == 0
    out = capsys.readouterr().out
    assert "wrote task 'shakespeare'" in out and "15 layers" in out and "1.000 bits" in out
    assert read_task_package(task).name == "shakespeare"

    assert main(["task-info", str(task), "--base", str(family.base)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "shakespeare" and info["layers"] == 15 and info["bits"] == 4
    assert info["fits_base"]["fits"] is True
    assert main(["task-info", str(task), "--base", str(other.base)]) == 0
    assert json.loads(capsys.readouterr().out)["fits_base"]["fits"] is False

    # errors: one line on stderr, status 1, nothing written
    assert main(["export-task", str(family.merged[0]), str(task)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qalora-tune: error:") and "--force" in err[0]
    assert main(["export-task", str(family.merged[0]), str(tmp_path / "x"), "--base", str(other.base)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another base" in err[0] and not (tmp_path / "x").exists()
    assert main(["task-info", str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["export-task", str(family.merged[0]), str(task), "--force", "--name", "s2"]) == 0
    assert read_task_package(task).name == "s2"
