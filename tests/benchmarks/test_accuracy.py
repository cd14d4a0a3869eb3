"""benchmarks/accuracy.py: its helpers, and a --quick run of every row on the real tiny model."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import accuracy

SHARED = Path(__file__).resolve().parents[3] / "shared"
needs_shared = pytest.mark.skipif(
    not (SHARED / "models" / "tinystories656K").is_dir() or not (SHARED / "data").is_dir(),
    reason="needs ../shared/models/tinystories656K and ../shared/data",
)

TRAINED = (accuracy.LORA_PTQ, accuracy.QLORA_PTQ, accuracy.QALORA)
# the plot needs the [bench] extra; CI installs [dev] only
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


# ----------------------------------------------------------------------------- helpers


def test_split_by_position_cuts_at_line_breaks_and_keeps_everything():
    text = "".join(f"line {i:03d} of the text\n" for i in range(200))
    parts = accuracy.split_by_position(text, (0.9, 0.05, 0.05))
    assert "".join(parts) == text
    assert all(part.endswith("\n") for part in parts)
    sizes = [len(part) / len(text) for part in parts]
    assert sizes[0] == pytest.approx(0.9, abs=0.01)
    assert sizes[1] == pytest.approx(0.05, abs=0.01)
    with pytest.raises(ValueError, match="sum to 1"):
        accuracy.split_by_position(text, (0.9, 0.2))


def test_split_records_takes_the_head_the_next_and_the_tail():
    records = list(range(4600))
    train, val, test = accuracy.split_records(records, (4000, 250, 250))
    assert train == list(range(4000))
    assert val == list(range(4000, 4250))
    assert test == list(range(4350, 4600))
    with pytest.raises(ValueError, match="need 4500 records"):
        accuracy.split_records(records[:4499], (4000, 250, 250))


def test_best_lr_ignores_diverged_runs_and_breaks_ties_low():
    assert accuracy.best_lr({1e-3: 5.0, 1e-2: 4.0, 3e-2: math.nan}) == 1e-2
    assert accuracy.best_lr({1e-2: 4.0, 1e-3: 4.0}) == 1e-3
    assert accuracy.best_lr({1e-2: math.inf, 1e-3: math.nan}) == 1e-3
    with pytest.raises(ValueError):
        accuracy.best_lr({})


def test_lr_extensions_step_past_the_edge_holding_a_best():
    grid = [1e-3, 3e-3, 1e-2]
    ratio = accuracy.grid_ratio(grid)
    assert ratio == pytest.approx(math.sqrt(10), rel=0.06)
    inside = {"row": {1e-3: 3.0, 3e-3: 2.0, 1e-2: 3.0}}
    assert accuracy.lr_extensions(grid, inside, 2) == []
    upper = {"row": {1e-3: 3.0, 3e-3: 2.5, 1e-2: 2.0}}
    assert accuracy.lr_extensions(grid, upper, 2) == [pytest.approx(1e-2 * ratio)]
    both = {"a": upper["row"], "b": {1e-3: 1.0, 3e-3: 2.0, 1e-2: 3.0}}
    assert accuracy.lr_extensions(grid, both, 1) == [
        pytest.approx(1e-3 / ratio),
        pytest.approx(1e-2 * ratio),
    ]
    # the cap counts learning rates already added past the grid
    extended = {"row": {**upper["row"], 1e-2 * ratio: 1.5}}
    assert accuracy.lr_extensions(grid, extended, 1) == []
    assert accuracy.lr_extensions(grid, extended, 2) == [pytest.approx(1e-2 * ratio**2)]
    assert accuracy.lr_extensions(grid, {"dead": dict.fromkeys(grid, math.nan)}, 2) == []
    assert not accuracy.is_bracketed(upper["row"])
    assert accuracy.is_bracketed(inside["row"])


def test_small_helpers():
    assert accuracy.mean_std([2.0]) == (2.0, None)
    mean, std = accuracy.mean_std([1.0, 2.0, 3.0])
    assert (mean, std) == (2.0, 1.0)
    assert accuracy.relative_difference(8.0, 10.0) == pytest.approx(-0.2)
    # k/v projections (64 x 128) have 128 NF4 scalers: torchtune's 256-block cannot hold them
    assert accuracy.nf4_scaler_block_size(64 * 128) == 128
    assert accuracy.nf4_scaler_block_size(128 * 128) == 256
    assert accuracy.nf4_scaler_block_size(384 * 128) == 256
    assert accuracy.qalora_alpha("mean", 32) == 16.0
    assert accuracy.qalora_alpha("sum", 64) == 16.0 * 64
    with pytest.raises(ValueError):
        accuracy.qalora_alpha("max", 32)


def test_quick_changes_defaults_but_explicit_options_win():
    assert accuracy.parse_args([]).steps == 200
    quick = accuracy.parse_args(["--quick"])
    assert (quick.steps, quick.bits, quick.group_sizes, quick.seeds) == (3, [4], [32], [0])
    assert accuracy.parse_args(["--quick", "--steps", "5", "--bits", "2"]).steps == 5
    assert accuracy.parse_args(["--quick", "--bits", "2"]).bits == [2]


def test_training_batches_are_fixed_by_the_seed():
    examples = [{"tokens": [i, i + 1], "labels": [i, i + 1]} for i in range(10)]

    def firsts(seed):
        return [b["tokens"][:, 0].tolist() for b in accuracy.training_batches(examples, 4, 6, seed)]

    assert firsts(0) == firsts(0)
    assert firsts(0) != firsts(1)
    batches = firsts(0)
    assert len(batches) == 6 and all(len(b) == 4 for b in batches)
    first_pass = [*batches[0], *batches[1], *batches[2][:2]]
    assert sorted(first_pass) == list(range(10))  # every example once before any repeats


def test_comparisons_use_validation_choices_and_seed_means():
    def row(method, quantizer, val, test, stories):
        return {
            "target": "t",
            "method": method,
            "quantizer": quantizer,
            "bits": 2,
            "group_size": 32,
            "val_ppl": [val],
            "test_ppl_mean": test,
            "tinystories_ppl_mean": stories,
        }

    rows = [
        row(accuracy.QALORA, "rtn", 10.0, 8.0, 30.0),
        row(accuracy.QALORA, "gptq", 11.0, 1.0, 1.0),  # worse on validation: not chosen
        row(accuracy.LORA_PTQ, "gptq", 12.0, 10.0, 40.0),
        row(accuracy.QLORA_PTQ, "rtn", 13.0, 9.0, 20.0),
        row(accuracy.INT_BASE, "rtn", 1.0, 1.0, 1.0),  # not a baseline
    ]
    (entry,) = accuracy.comparisons(rows, ["t"], [2], [32])
    assert entry["qalora"] == "QA-LoRA merged (rtn)"
    assert entry["baseline"] == "LoRA -> PTQ (gptq)"
    assert entry["test_ppl_relative"] == pytest.approx(-0.2)
    assert entry["tinystories_ppl_relative"] == pytest.approx(-0.25)


def test_missing_shared_folder_exits_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        accuracy.main(["--quick", "--shared", str(tmp_path)])


# ----------------------------------------------------------------------------- the benchmark


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    paths = {name: out / f"accuracy.{name}" for name in ("json", "md", "png")}
    plot = ["--plot", str(paths["png"])] if HAS_MATPLOTLIB else []
    accuracy.main(["--quick", "--json", str(paths["json"]), "--markdown", str(paths["md"]), *plot])
    return json.loads(paths["json"].read_text()), paths


def _rows(report, target, method, quantizer=None):
    return [
        r
        for r in report["rows"]
        if r["target"] == target and r["method"] == method and r["quantizer"] == quantizer
    ]


@needs_shared
def test_quick_run_reports_every_requested_row(quick):
    report, _ = quick
    settings = report["settings"]
    for target in accuracy.TARGETS:
        for method in (accuracy.FP32_BASE, accuracy.LORA_FP32):
            assert len(_rows(report, target, method)) == 1
        for method in (accuracy.INT_BASE, *TRAINED):
            for quantizer in accuracy.QUANTIZER_NAMES:
                (row,) = _rows(report, target, method, quantizer)
                assert (row["bits"], row["group_size"]) == (4, 32)
    for row in report["rows"]:
        assert not row.get("skipped"), row
        for name in ("val_ppl", "test_ppl", "tinystories_ppl"):
            assert len(row[name]) == len(settings["seeds"]) == 1
            assert math.isfinite(row[f"{name}_mean"]) and row[f"{name}_mean"] > 1.0
    assert {e["target"] for e in report["comparisons"]} == set(accuracy.TARGETS)


@needs_shared
def test_quick_run_gives_every_method_the_same_budget_and_tunes_each(quick):
    report, _ = quick
    trainings = report["trainings"]
    assert {t["method"] for t in trainings} == {"lora", "qlora", "qalora", "qalora_defaults"}
    assert all(t["steps_run"] == 3 and t["final_loss"] is not None for t in trainings)
    for row in report["rows"]:
        if row["method"] in TRAINED or row["method"] == accuracy.LORA_FP32:
            # QA-LoRA is tuned on one quantizer's base and reuses the choice for the others
            tuned_on = row.get("tuned_on", row["quantizer"])
            tried = [
                s
                for s in report["lr_search"]
                if s["target"] == row["target"]
                and s["method"] == row["method"]
                and s["quantizer"] == tuned_on
                and (s["bits"], s["group_size"]) == (row["bits"], row["group_size"])
            ]
            assert (row["lr"], row["alpha"]) in {(s["lr"], s["alpha"]) for s in tried}
    poolings = {s["pooling"] for s in report["lr_search"] if s["method"] == accuracy.QALORA}
    assert poolings == {"mean", "sum"}


@needs_shared
def test_quick_run_merged_qalora_matches_unmerged_and_training_moved_it(quick):
    report, _ = quick
    for target in accuracy.TARGETS:
        for quantizer in accuracy.QUANTIZER_NAMES:
            (row,) = _rows(report, target, accuracy.QALORA, quantizer)
            assert row["merge_deviation_mean"] < 0.005
            assert row["test_ppl"][0] == pytest.approx(row["unmerged_test_ppl"][0], rel=0.005)
            (base,) = _rows(report, target, accuracy.INT_BASE, quantizer)
            assert row["test_ppl"][0] != pytest.approx(base["test_ppl"][0], rel=1e-4)


@needs_shared
def test_quick_run_reports_the_packaged_defaults_without_a_search(quick):
    """One row per target on the tuning quantizer's base, trained at the packaged config's
    learning rate and schedule with the builders' (sum) pooling, never in the search log."""
    from omegaconf import OmegaConf

    from qalora_tune.recipe_utils import resolve_config

    report, paths = quick
    config = OmegaConf.load(resolve_config("tinystories656K_qalora"))
    for target in accuracy.TARGETS:
        (row,) = [r for r in report["rows"]
                  if r["target"] == target and r["method"] == accuracy.QALORA_DEFAULTS]
        assert row["quantizer"] == "rtn" and (row["bits"], row["group_size"]) == (4, 32)
        assert row["lr"] == float(config.optimizer.lr) and row["pooling"] == "sum"
        assert row["packaged"]["min_lr_ratio"] == float(config.lr_scheduler.min_lr_ratio)
        assert row["packaged"]["warmup_steps"] == int(config.lr_scheduler.num_warmup_steps)
        assert row["merge_deviation_mean"] < 0.005
        (tuned,) = _rows(report, target, accuracy.QALORA, "rtn")
        assert row["test_ppl"][0] != pytest.approx(tuned["test_ppl"][0], rel=1e-4)
    assert not [s for s in report["lr_search"] if s["method"] == accuracy.QALORA_DEFAULTS]
    markdown = paths["md"].read_text()
    assert "| QA-LoRA merged, packaged defaults (rtn) |" in markdown
    assert "not searched: tinystories656K_qalora's lr" in markdown


@needs_shared
def test_quick_run_writes_json_markdown_and_plot(quick):
    report, paths = quick
    assert {"torch", "torchao", "torchtune", "cpu", "command"} <= set(report["environment"])
    markdown = paths["md"].read_text()
    assert markdown.startswith("`python benchmarks/accuracy.py --quick")
    assert "## shakespeare" in markdown and "## alpaca" in markdown
    assert "| QA-LoRA merged (gptq) |" in markdown
    if HAS_MATPLOTLIB:  # pip install -e '.[bench]'
        assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    blocks = report["nf4_scaler_blocks"]
    assert blocks["layers.0.attn.k_proj"] == 128 and blocks["layers.0.attn.q_proj"] == 256


@needs_shared
def test_untrained_adapters_reproduce_the_quantized_base(tmp_path):
    """With 0 steps QA-LoRA (B = 0, merged) is the int-b base of its quantizer, and LoRA
    merged then quantized is too (the same weights go through the same quantizer)."""
    report = accuracy.main(
        [
            "--quick",
            "--steps",
            "0",
            "--targets",
            "shakespeare",
            "--quantizers",
            "rtn",
            "gptq",
            "--group-sizes",
            "32",
            "8",
        ]
    )
    (fp32,) = _rows(report, "shakespeare", accuracy.FP32_BASE)
    (lora,) = _rows(report, "shakespeare", accuracy.LORA_FP32)
    assert lora["test_ppl"][0] == pytest.approx(fp32["test_ppl"][0], rel=1e-6)
    checked = 0
    for base in _rows(report, "shakespeare", accuracy.INT_BASE, "rtn") + _rows(
        report, "shakespeare", accuracy.INT_BASE, "gptq"
    ):
        if base.get("skipped"):  # a group size the library cannot store yet
            assert "group_size" in base["skipped"]
            continue
        for method in (accuracy.LORA_PTQ, accuracy.QALORA):
            (row,) = [
                r
                for r in _rows(report, "shakespeare", method, base["quantizer"])
                if r["group_size"] == base["group_size"]
            ]
            for name in ("test_ppl", "tinystories_ppl"):
                assert row[name][0] == pytest.approx(base[name][0], rel=1e-5), (method, base["key"])
            checked += 1
    assert checked >= 4
