"""benchmarks/lr_transfer.py: its helpers, its model and optimizer components, and a
--quick run (a tiny base, no ../shared needed)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _lr_transfer_sweep  # noqa: E402
import lr_transfer  # noqa: E402

from qalora_tune.modules import QALoRALinear

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
QUICK_CASE = lr_transfer.QUICK_DEFAULTS["cases"][0]


# ----------------------------------------------------------------------------- helpers


def test_log_parabola_minimum_finds_the_vertex_between_grid_points():
    vertex = 0.05
    curve = {lr: 2.0 + (math.log(lr) - math.log(vertex)) ** 2 for lr in (0.01, 0.03, 0.1, 0.3)}
    assert lr_transfer.log_parabola_minimum(curve) == pytest.approx(vertex, rel=1e-9)
    # at an edge, or beside a diverged point, the grid point itself
    assert lr_transfer.log_parabola_minimum({0.01: 1.0, 0.03: 2.0, 0.1: 3.0}) == 0.01
    assert lr_transfer.log_parabola_minimum({0.01: 3.0, 0.03: 2.0, 0.1: math.inf}) == 0.03


def test_single_rate_regret_minimises_the_worst_excess():
    curves = {"a": {0.01: 1.0, 0.1: 1.5, 1.0: 3.0}, "b": {0.01: 4.0, 0.1: 2.2, 1.0: 2.0}}
    found = lr_transfer.single_rate_regret(curves)
    assert found["lr"] == 0.1
    assert found["worst_excess"] == pytest.approx(0.5)
    assert found["excess"] == pytest.approx({"a": 0.5, "b": 0.1})


def test_shared_paths_of_the_packaged_configs_move_under_shared():
    config = {"a": "../shared/models/x", "b": ["../shared/data/y.txt", 3], "c": "/abs/../shared"}
    moved = lr_transfer._rebase_shared(config, Path("/data/shared"))
    assert moved == {"a": "/data/shared/models/x", "b": ["/data/shared/data/y.txt", 3], "c": "/abs/../shared"}


def test_every_case_is_on_an_axis_and_named_uniquely():
    names = [case.name for case in lr_transfer.CASES]
    assert len(names) == len(set(names))
    for case in lr_transfer.CASES:
        assert case.axes and set(case.axes) <= set(lr_transfer.AXES) | {"centre"}
    for axis in lr_transfer.AXES:
        assert sum(axis in case.axes for case in lr_transfer.CASES) >= 2, axis


# ----------------------------------------------------------------------------- components


def _knobs():
    return dict(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4,
                lora_alpha=8.0, group_size=32)


def test_adapted_model_with_sum_pooling_is_the_builders_model():
    from qalora_tune.tiny import qalora_tiny_llama

    torch.manual_seed(3)
    expected = qalora_tiny_llama(**_knobs())
    torch.manual_seed(3)
    got = lr_transfer.adapted_model("qalora_tune.tiny.qalora_tiny_llama", "sum", **_knobs())
    adapters = [(n, p) for n, p in expected.named_parameters() if p.requires_grad]
    assert [n for n, _ in adapters] == [n for n, p in got.named_parameters() if p.requires_grad]
    for (name, a), b in zip(adapters, (p for p in got.parameters() if p.requires_grad)):
        assert torch.equal(a, b), name


def test_adapted_model_with_mean_pooling_draws_a_in_that_convention():
    torch.manual_seed(0)
    model = lr_transfer.adapted_model("unused", "mean", embed_dim=256, **_knobs())
    layers = [m for m in model.modules() if isinstance(m, QALoRALinear)]
    assert layers and all(m.pooling == "mean" for m in layers)
    assert model.tok_embeddings.embedding_dim == 256
    for layer in layers:  # nn.Linear's default bound on A's own fan-in, n_groups
        assert layer.lora_a.weight.abs().max() > 0.8 / layer.n_groups**0.5
        assert torch.count_nonzero(layer.lora_b.weight) == 0


def test_lora_plus_optimizer_gives_b_its_own_rate():
    a1, b1 = torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(8, 4))
    a2, b2 = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(5, 2))
    optimizer = lr_transfer.adamw_lora_plus([a1, b1, a2, b2], lr=0.01, b_lr_ratio=16.0, weight_decay=0.0)
    (group_a, group_b) = optimizer.param_groups
    assert group_a["params"] == [a1, a2] and group_a["lr"] == 0.01
    assert group_b["params"] == [b1, b2] and group_b["lr"] == pytest.approx(0.16)
    with pytest.raises(ValueError, match="A, B pairs"):
        lr_transfer.adamw_lora_plus([b1, a1], lr=0.01)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    work = tmp_path_factory.mktemp("lr_transfer")
    outputs = {"json": work / "out.json", "md": work / "out.md", "png": work / "out.png"}
    plot = ["--plot", str(outputs["png"])] if HAS_MATPLOTLIB else []
    argv = ["--quick", "--work-dir", str(work), "--json", str(outputs["json"]),
            "--markdown", str(outputs["md"]), *plot]
    report = lr_transfer.main(argv)
    return report, outputs, argv, work


def test_quick_run_measures_both_parametrizations_and_the_side_studies(quick):
    report, outputs, _, _ = quick
    points = report["points"]
    assert {(p["pooling"], p["lr"]) for p in points if p["b_lr_ratio"] == 1.0 and p["min_lr_ratio"] is None
            and p["warmup_steps"] is None} == {
        ("mean", 0.1), ("sum", 0.03)}
    assert all(p["loss"] is not None and math.isfinite(p["loss"]) and p["cpu_seconds"] > 0 for p in points)
    found = report["analysis"]["cases"][QUICK_CASE]
    assert set(found) == {"mean", "sum"} and found["sum"]["best_lr"] == 0.03
    assert [e["variant"] for e in report["lora_plus"]] == ["B/A = 1", "B/A = 4"]
    # the reference is the case's own schedule (the tiny widths: tiny_qalora's floor)
    assert [e["variant"] for e in report["schedule"]] == [
        "as packaged: warmup 10 steps, cosine to 0.1 x peak", "warmup 20 steps",
        "cosine to 0 x peak"]
    assert sum(p.get("warmup_steps") == 20 for p in points) == 3
    assert sum(p["b_lr_ratio"] == 4.0 for p in points) == 3
    assert sum(p["min_lr_ratio"] == 0.0 for p in points) == 3
    assert json.loads(outputs["json"].read_text())["analysis"] == json.loads(
        json.dumps(report["analysis"]))
    scale = report["input_scale"][QUICK_CASE]
    assert 0 < scale["sum"]["min"] <= scale["sum"]["median"] <= scale["sum"]["max"]
    assert scale["mean"]["median"] == pytest.approx(scale["sum"]["median"] / 64**0.5)
    markdown = outputs["md"].read_text()
    assert f"| {QUICK_CASE} | width |" in markdown and "## Schedule floor" in markdown
    if HAS_MATPLOTLIB:
        assert outputs["png"].stat().st_size > 0


def test_a_rerun_reads_every_point_from_the_cache(quick, monkeypatch):
    report, _, argv, _ = quick

    def refuse(*args, **kwargs):
        raise AssertionError("a cached point must not run again")

    monkeypatch.setattr(_lr_transfer_sweep, "_quiet_run_point", refuse)  # what Sweep.run calls
    again = lr_transfer.main(argv)
    assert sorted(json.dumps(p, sort_keys=True) for p in again["points"]) == sorted(
        json.dumps(p, sort_keys=True) for p in report["points"])


def test_a_sum_point_is_the_recipe_run_with_the_same_overrides(quick, tmp_path):
    """The benchmark's model wrapper changes nothing for sum pooling: the point's loss is
    what ``tune run qalora_finetune --config tiny_qalora ...`` gives."""
    import qalora_finetune

    report, _, argv, work = quick
    args = lr_transfer.parse_args(argv)
    point = lr_transfer.Point(QUICK_CASE, "sum", 0.03, 0)
    (record,) = [p for p in report["points"] if lr_transfer.Point(
        **{k: p[k] for k in ("case", "pooling", "lr", "seed", "b_lr_ratio", "min_lr_ratio",
                             "warmup_steps")}) == point]
    overrides = lr_transfer.point_overrides(point, args, tmp_path / "run")
    overrides = [o for o in overrides if not o.startswith(("model._component_", "model.pooling", "model.builder"))]
    case = lr_transfer.case_by_name(QUICK_CASE)
    overrides += ["model._component_=qalora_tune.tiny.qalora_tiny_llama"] if case.width == 128 else []
    overrides = [o for o in overrides if not o.startswith("model.embed_dim")]
    qalora_finetune.main(["qalora_finetune", "--config", "tiny_qalora", *overrides])  # exits 1 on error
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["QA-LoRA"]["loss"] == record["loss"]


def test_check_defaults_runs_the_packaged_command_and_compares_with_the_sweep(tmp_path, monkeypatch):
    """One packaged run per seed (the config's own seed unchanged, another as ``seed=S``),
    their mean log perplexity against the sweep's best mean over the same seeds."""
    import subprocess

    name = "tinystories656K_qalora G32 b2"
    args = lr_transfer.parse_args(["--cases", name, "--work-dir", str(tmp_path), "--seeds", "0", "1"])
    sweep = lr_transfer.Sweep(args)
    for lr, losses in ((0.01, (4.0, 4.2)), (0.03, (3.9, 3.9)), (0.1, (4.5, 4.4))):
        for seed, loss in zip((0, 1), losses):
            point = lr_transfer.Point(name, "sum", lr, seed)
            sweep.results[point.key()] = {**lr_transfer.dataclasses.asdict(point), "loss": loss}
    commands = []
    factors = {"0": 1.01, "1": 1.03}  # per seed: the mean of their logs is about 2% above

    def fake_run(command, cwd, capture_output, text):
        commands.append((command, cwd))
        seed = next((c.split("=", 1)[1] for c in command if c.startswith("seed=")), "0")
        output_dir = Path(next(c for c in command if c.startswith("output_dir=")).split("=", 1)[1])
        output_dir.mkdir(parents=True)
        metrics = {"QA-LoRA": {"perplexity": math.exp(3.9) * factors[seed]},
                   "QA-LoRA merged int4": {"perplexity": math.exp(3.9) * factors[seed]}}
        (output_dir / "summary.json").write_text(json.dumps({"metrics": metrics}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    (row,) = lr_transfer.check_defaults(args, sweep)
    assert lr_transfer._config_seed("tinystories656K_qalora") == 0
    assert sorted(command[1:] for command, _ in commands) == [
        ["run", "qalora_finetune", "--config", "tinystories656K_qalora", "model.bits=2",
         f"output_dir={tmp_path / 'defaults' / 'tinystories656K_qalora_b2'}"],
        ["run", "qalora_finetune", "--config", "tinystories656K_qalora", "model.bits=2",
         "seed=1", f"output_dir={tmp_path / 'defaults' / 'tinystories656K_qalora_b2_seed1'}"],
    ]
    assert all(cwd == args.shared or not args.shared.is_dir() for _, cwd in commands)
    assert row["best_lr"] == 0.03 and row["best"] == pytest.approx(math.exp(3.9))
    assert row["excess"] == pytest.approx(math.sqrt(1.01 * 1.03) - 1)
    assert row["default_per_seed"] == pytest.approx([math.exp(3.9) * 1.01, math.exp(3.9) * 1.03])
    assert row["seeds"] == [0, 1]
    assert row["metric"] == "validation perplexity"
    assert row["default_lr"] == lr_transfer._config_lr("tinystories656K_qalora")
    lr_transfer.check_defaults(args, sweep)  # a second check reads the finished runs
    assert len(commands) == 2
