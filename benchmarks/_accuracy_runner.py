"""The rows of ``benchmarks/accuracy.py``: :class:`Benchmark` trains and evaluates every
method of one target, tunes learning rates and repeats the headline rows per seed."""

import argparse
import time
from collections.abc import Sequence
from typing import Any

from _accuracy_common import (
    ALPHA,
    BASELINES,
    DEFAULTS_CONFIG,
    FP32_BASE,
    INT_BASE,
    LORA_FP32,
    LORA_PTQ,
    MODEL_SUBDIR,
    QALORA,
    QALORA_DEFAULTS,
    QLORA_PTQ,
    TRAINED_BASELINE,
    _finite,
    _json_float,
    _log,
    _rename,
    _row_key,
    best_lr,
    best_row,
    is_bracketed,
    lr_extensions,
    mean_std,
    qalora_alpha,
    tuning_quantizer,
)
from _accuracy_data import TargetData, tinystories_batches, training_batches
from _accuracy_models import Models, State, adapter_state, merge_all, perplexity, train
from _report import packaged_config
from torch import nn


class Benchmark:
    """Runs every row of one invocation and collects the results."""

    def __init__(self, args: argparse.Namespace):
        from qalora_tune.data import text_tokenizer

        self.args = args
        self.tokenizer = text_tokenizer(
            str(args.shared / MODEL_SUBDIR / "tokenizer.json"), prepend_space=False
        )
        self.models = Models(args)
        self.tinystories = tinystories_batches(self.tokenizer, args)
        self.search: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        self.skipped: dict[tuple[str, int, int, str], str] = {}
        self.trainings: list[dict[str, Any]] = []
        self._merged: dict[tuple, State] = {}
        self._qalora: dict[tuple, dict[str, Any]] = {}
        self._bracketed: dict[tuple, bool] = {}
        self.phase_seconds: dict[str, float] = {}

    # ---------------------------------------------------------------- helpers

    def combos(self) -> list[tuple[int, int]]:
        """Every ``(bits, group_size)`` of the run."""
        return [(b, g) for b in self.args.bits for g in self.args.group_sizes]

    def scores(
        self, model: nn.Module, target: TargetData, splits: Sequence[str]
    ) -> dict[str, float]:
        """Perplexity of ``model`` on each of ``splits`` (``val``, ``test``, ``tinystories``)."""
        batches = {"val": target.val, "test": target.test, "tinystories": self.tinystories}
        return {split: perplexity(model, batches[split]) for split in splits}

    def _train(
        self,
        kind: str,
        model: nn.Module,
        target: TargetData,
        lr: float,
        seed: int,
        schedule: dict[str, Any] | None = None,
        **extra: Any,
    ) -> tuple[list[float], float]:
        """Train ``model`` on the target's batches for ``seed`` (``schedule``: the warmup and
        floor keywords of :func:`train`, its defaults if unset), and record the run;
        returns the losses and the seconds it took."""
        start = time.perf_counter()
        losses = train(
            model,
            training_batches(target.train, self.args.batch_size, self.args.steps, seed),
            self.args.steps,
            lr,
            **(schedule or {}),
        )
        seconds = time.perf_counter() - start
        self._record_training(kind, target, lr, seed, losses, seconds, **extra)
        return losses, seconds

    def _record_training(
        self,
        kind: str,
        target: TargetData,
        lr: float,
        seed: int,
        losses: list[float],
        seconds: float,
        **extra: Any,
    ) -> None:
        self.trainings.append(
            dict(
                method=kind,
                target=target.name,
                lr=lr,
                seed=seed,
                steps_run=len(losses),
                first_loss=_json_float(losses[0]) if losses else None,
                final_loss=_json_float(losses[-1]) if losses else None,
                seconds=seconds,
                **extra,
            )
        )

    def add_row(
        self,
        target: TargetData,
        method: str,
        quantizer: str | None = None,
        bits: int | None = None,
        group_size: int | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Append a result row (numbers are added by :meth:`set_seeded`) and return it."""
        row = {
            "target": target.name,
            "method": method,
            "quantizer": quantizer,
            "bits": bits,
            "group_size": group_size,
            "key": _row_key(method, quantizer, bits, group_size),
        }
        row.update(fields)
        self.rows.append(row)
        return row

    @staticmethod
    def set_seeded(row: dict[str, Any], seed: int, numbers: dict[str, float]) -> None:
        """Store one seed's numbers in a row (lists per seed, plus mean and std)."""
        row.setdefault("seeds", [])
        row["seeds"].append(seed)
        for name, value in numbers.items():
            row.setdefault(name, []).append(_json_float(value))
            finite = [v for v in row[name] if v is not None]
            mean, std = mean_std(finite) if finite else (None, None)
            row[f"{name}_mean"], row[f"{name}_std"] = mean, std

    # ---------------------------------------------------------------- rows without training

    def base_rows(self, target: TargetData) -> None:
        """The fp32 base and every int-b base; a base the library refuses (``ValueError``)
        is recorded as skipped, with every row that needs it."""
        scores = self.scores(self.models.full_precision(), target, ("val", "test", "tinystories"))
        self.set_seeded(self.add_row(target, FP32_BASE), 0, _rename(scores))
        for bits, group_size in self.combos():
            for quantizer in self.args.quantizers:
                row = self.add_row(target, INT_BASE, quantizer, bits, group_size)
                try:
                    model = self.models.quantized(None, bits, group_size, quantizer, target)
                except ValueError as error:
                    self.skipped[(target.name, bits, group_size, quantizer)] = str(error)
                    row["skipped"] = str(error)
                    _log(f"{target.name}: skip b={bits} G={group_size} {quantizer}: {error}")
                    continue
                scores = self.scores(model, target, ("val", "test", "tinystories"))
                self.set_seeded(row, 0, _rename(scores))

    def is_skipped(
        self, target: TargetData, bits: int, group_size: int, quantizer: str
    ) -> str | None:
        """Why the int-b base of ``(bits, group_size, quantizer)`` could not be built, if so."""
        return self.skipped.get((target.name, bits, group_size, quantizer))

    # ---------------------------------------------------------------- LoRA / QLoRA

    def merged_baseline(self, target: TargetData, kind: str, lr: float, seed: int) -> State:
        """Train LoRA (``kind="lora"``) or QLoRA (``"qlora"``) and return the merged fp32
        weights (cached per learning rate and seed)."""
        key = (target.name, kind, lr, seed)
        if key not in self._merged:
            model = self.models.lora(seed, nf4=kind == "qlora")
            losses, seconds = self._train(kind, model, target, lr, seed)
            _log(
                f"{target.name}: {kind} lr={lr:.3g} seed={seed}: loss {losses[-1] if losses else '-'} "
                f"({seconds:.0f}s)"
            )
            self._merged[key] = self.models.merged_lora_state(model)
        return self._merged[key]

    def ptq_scores(
        self,
        target: TargetData,
        state: State,
        bits: int,
        group_size: int,
        quantizer: str,
        splits: Sequence[str],
    ) -> dict[str, float]:
        """Perplexities of the fp32 weights ``state`` after post-training quantization."""
        model = self.models.quantized(state, bits, group_size, quantizer, target)
        return self.scores(model, target, splits)

    def tune_baseline(self, target: TargetData, method: str) -> None:
        """Train one baseline at every learning rate (extending the grid while a row's best
        is at an edge), choose the learning rate per row, and report the rows."""
        kind = TRAINED_BASELINE[method]
        criteria: dict[str, dict[float, float]] = {}
        pending = list(self.args.lr_grid)
        while pending:
            for lr in pending:
                state = self.merged_baseline(target, kind, lr, self.args.seeds[0])
                self._baseline_candidate(target, method, lr, state, criteria)
            pending = lr_extensions(self.args.lr_grid, criteria, self.args.max_lr_extensions)
        if method == LORA_PTQ:
            self._report_baseline_row(target, LORA_FP32, None, None, None, criteria)
        for bits, group_size in self.combos():
            for quantizer in self.args.quantizers:
                self._report_baseline_row(target, method, quantizer, bits, group_size, criteria)

    def _baseline_candidate(
        self,
        target: TargetData,
        method: str,
        lr: float,
        state: State,
        criteria: dict[str, dict[float, float]],
    ) -> None:
        if method == LORA_PTQ:
            val = self.scores(self.models.full_precision(state), target, ("val",))["val"]
            criteria.setdefault(_row_key(LORA_FP32, None, None, None), {})[lr] = val
            self._record_search(target, LORA_FP32, None, None, None, lr, ALPHA, val)
        for bits, group_size in self.combos():
            for quantizer in self.args.quantizers:
                if self.is_skipped(target, bits, group_size, quantizer):
                    continue
                val = self.ptq_scores(target, state, bits, group_size, quantizer, ("val",))["val"]
                criteria.setdefault(_row_key(method, quantizer, bits, group_size), {})[lr] = val
                self._record_search(target, method, quantizer, bits, group_size, lr, ALPHA, val)

    def _report_baseline_row(
        self,
        target: TargetData,
        method: str,
        quantizer: str | None,
        bits: int | None,
        group_size: int | None,
        criteria: dict[str, dict[float, float]],
    ) -> None:
        row = self.add_row(target, method, quantizer, bits, group_size)
        reason = quantizer and self.is_skipped(target, bits, group_size, quantizer)
        if reason:
            row["skipped"] = reason
            return
        per_lr = criteria[row["key"]]
        row.update(
            lr=best_lr(per_lr),
            alpha=ALPHA,
            val_ppl_tuning=_json_float(per_lr[best_lr(per_lr)]),
            lr_bracketed=is_bracketed(per_lr),
        )
        self.baseline_seed(target, row, self.args.seeds[0])

    def baseline_seed(self, target: TargetData, row: dict[str, Any], seed: int) -> None:
        """Test and TinyStories perplexity of a baseline row trained with ``seed``."""
        kind = "lora" if row["method"] == LORA_FP32 else TRAINED_BASELINE[row["method"]]
        state = self.merged_baseline(target, kind, row["lr"], seed)
        splits = ("val", "test", "tinystories")
        if row["method"] == LORA_FP32:
            scores = self.scores(self.models.full_precision(state), target, splits)
        else:
            scores = self.ptq_scores(
                target, state, row["bits"], row["group_size"], row["quantizer"], splits
            )
        self.set_seeded(row, seed, _rename(scores))

    # ---------------------------------------------------------------- QA-LoRA

    def qalora_run(
        self,
        target: TargetData,
        bits: int,
        group_size: int,
        quantizer: str,
        lr: float,
        pooling: str,
        seed: int,
    ) -> dict[str, Any]:
        """Train QA-LoRA once (cached): adapter weights and merged validation perplexity."""
        key = (target.name, bits, group_size, quantizer, lr, pooling, seed)
        if key not in self._qalora:
            alpha = qalora_alpha(pooling, group_size)
            model = self.models.qalora(bits, group_size, quantizer, alpha, seed, target)
            _, seconds = self._train(
                "qalora",
                model,
                target,
                lr,
                seed,
                bits=bits,
                group_size=group_size,
                quantizer=quantizer,
                pooling=pooling,
            )
            adapter = adapter_state(model)
            merge_all(model)
            val = self.scores(model, target, ("val",))["val"]
            _log(
                f"{target.name}: qalora b={bits} G={group_size} {quantizer} {pooling} lr={lr:.3g} "
                f"seed={seed}: val ppl {val:.3f} ({seconds:.0f}s)"
            )
            self._qalora[key] = {"adapter": adapter, "val": val, "alpha": alpha}
        return self._qalora[key]

    def qalora_evaluation(
        self,
        target: TargetData,
        bits: int,
        group_size: int,
        quantizer: str,
        lr: float,
        pooling: str,
        seed: int,
    ) -> dict[str, float]:
        """Unmerged and merged test perplexity, merged validation and TinyStories perplexity,
        and the merged-vs-unmerged deviation of a trained QA-LoRA model."""
        run = self.qalora_run(target, bits, group_size, quantizer, lr, pooling, seed)
        model = self.models.qalora(bits, group_size, quantizer, run["alpha"], seed, target)
        model.load_state_dict(run["adapter"], strict=False)
        return self.merged_scores(model, target)

    def merged_scores(self, model: nn.Module, target: TargetData) -> dict[str, float]:
        """A trained QA-LoRA model's unmerged test perplexity, then merged: validation, test
        and TinyStories perplexity and the merged-vs-unmerged deviation (merges ``model``)."""
        unmerged = self.scores(model, target, ("test",))["test"]
        merge_all(model)
        scores = _rename(self.scores(model, target, ("val", "test", "tinystories")))
        scores["unmerged_test_ppl"] = unmerged
        scores["merge_deviation"] = abs(scores["test_ppl"] / unmerged - 1.0)
        return scores

    def tune_qalora(
        self, target: TargetData, bits: int, group_size: int
    ) -> tuple[float, str] | None:
        """The (learning rate, pooling) with the best merged validation perplexity on the
        tuning quantizer's base; ``None`` if that base is skipped."""
        quantizer = self.tuning_quantizer()
        if self.is_skipped(target, bits, group_size, quantizer):
            return None
        best: dict[str, tuple[float, float]] = {}
        for pooling in self.args.pooling:
            grid = self.args.qalora_lr_grid if pooling == "mean" else self.args.qalora_sum_lr_grid
            per_lr: dict[float, float] = {}
            pending = list(grid)
            while pending:
                for lr in pending:
                    val = self.qalora_run(
                        target, bits, group_size, quantizer, lr, pooling, self.args.seeds[0]
                    )["val"]
                    per_lr[lr] = val
                    self._record_search(
                        target,
                        QALORA,
                        quantizer,
                        bits,
                        group_size,
                        lr,
                        qalora_alpha(pooling, group_size),
                        val,
                        pooling=pooling,
                    )
                pending = lr_extensions(grid, {pooling: per_lr}, self.args.max_lr_extensions)
            lr = best_lr(per_lr)
            best[pooling] = (lr, per_lr[lr])
            self._bracketed[(target.name, bits, group_size, pooling)] = is_bracketed(per_lr)
        pooling = min(best, key=lambda p: _finite(best[p][1]))
        return best[pooling][0], pooling

    def tuning_quantizer(self) -> str:
        """See :func:`tuning_quantizer`."""
        return tuning_quantizer(self.args.quantizers)

    def qalora_rows(self, target: TargetData) -> None:
        """Tune QA-LoRA per ``(b, G)``, then report it merged on every quantizer's base."""
        for bits, group_size in self.combos():
            failure = f"the {self.tuning_quantizer()} base used for tuning is skipped"
            try:
                choice = self.tune_qalora(target, bits, group_size)
            except ValueError as error:
                choice, failure = None, str(error)
                _log(f"{target.name}: QA-LoRA b={bits} G={group_size} skipped: {error}")
            for quantizer in self.args.quantizers:
                row = self.add_row(target, QALORA, quantizer, bits, group_size)
                reason = self.is_skipped(target, bits, group_size, quantizer)
                if reason or choice is None:
                    row["skipped"] = reason or failure
                    continue
                lr, pooling = choice
                row.update(
                    lr=lr,
                    pooling=pooling,
                    alpha=qalora_alpha(pooling, group_size),
                    tuned_on=self.tuning_quantizer(),
                    lr_bracketed=self._bracketed[(target.name, bits, group_size, pooling)],
                )
                try:
                    self.qalora_seed(target, row, self.args.seeds[0])
                except ValueError as error:
                    row["skipped"] = str(error)
                    _log(
                        f"{target.name}: QA-LoRA b={bits} G={group_size} {quantizer} skipped: {error}"
                    )

    def packaged_defaults(self) -> dict[str, Any]:
        """The learning rate and schedule of the packaged config of this benchmark's model
        (:data:`DEFAULTS_CONFIG`), as a user who changes nothing trains with them."""
        config = packaged_config(DEFAULTS_CONFIG)
        scheduler = config.get("lr_scheduler", {})
        return {
            "config": DEFAULTS_CONFIG,
            "lr": float(config.optimizer.lr),
            "warmup_steps": int(scheduler.get("num_warmup_steps", 0)),
            "min_lr_ratio": float(scheduler.get("min_lr_ratio", 0.0)),
            "pooling": str(config.model.get("pooling", "sum")),
        }

    def packaged_defaults_rows(self, target: TargetData) -> None:
        """Per ``(b, G)``, QA-LoRA as the packaged config trains it, with no learning-rate
        search: the builders' pooling and initialisation, the config's learning rate,
        warmup and schedule floor (rank, alpha, steps and batches are this benchmark's), on
        the tuning quantizer's base, first seed."""
        defaults = self.packaged_defaults()
        quantizer, seed = self.tuning_quantizer(), self.args.seeds[0]
        for bits, group_size in self.combos():
            row = self.add_row(target, QALORA_DEFAULTS, quantizer, bits, group_size,
                               lr=defaults["lr"], pooling=defaults["pooling"], alpha=ALPHA,
                               lr_bracketed=None, packaged=defaults)
            reason = self.is_skipped(target, bits, group_size, quantizer)
            if reason:
                row["skipped"] = reason
                continue
            model = self.models.qalora(bits, group_size, quantizer, ALPHA, seed, target,
                                       legacy_mean=False)
            schedule = {"warmup_steps": defaults["warmup_steps"],
                        "min_lr_ratio": defaults["min_lr_ratio"]}
            self._train("qalora_defaults", model, target, defaults["lr"], seed, schedule,
                        bits=bits, group_size=group_size, quantizer=quantizer)
            scores = self.merged_scores(model, target)
            self.set_seeded(row, seed, scores)
            _log(f"{target.name}: packaged defaults b={bits} G={group_size}: "
                 f"val ppl {scores['val_ppl']:.3f}")

    def qalora_seed(self, target: TargetData, row: dict[str, Any], seed: int) -> None:
        """Add one seed's numbers to a QA-LoRA row (trained at the row's tuned settings)."""
        scores = self.qalora_evaluation(
            target,
            row["bits"],
            row["group_size"],
            row["quantizer"],
            row["lr"],
            row["pooling"],
            seed,
        )
        self.set_seeded(row, seed, scores)

    # ---------------------------------------------------------------- seeds, search log

    def _record_search(
        self,
        target: TargetData,
        method: str,
        quantizer: str | None,
        bits: int | None,
        group_size: int | None,
        lr: float,
        alpha: float,
        val: float,
        **extra: Any,
    ) -> None:
        self.search.append(
            dict(
                target=target.name,
                method=method,
                quantizer=quantizer,
                bits=bits,
                group_size=group_size,
                lr=lr,
                alpha=alpha,
                seed=self.args.seeds[0],
                val_ppl=_json_float(val),
                **extra,
            )
        )

    def headline_rows(self, target: TargetData) -> list[dict[str, Any]]:
        """Per bit width and headline group size: the QA-LoRA row and the baseline row with
        the best validation perplexity."""
        chosen = []
        for bits in self.args.bits:
            for group_size in self.args.headline_group_sizes:
                if group_size not in self.args.group_sizes:
                    continue
                for methods in ((QALORA,), BASELINES):
                    best = best_row(self.rows, target.name, methods, bits, group_size)
                    if best is not None:
                        chosen.append(best)
        return chosen

    def seed_headline(self, target: TargetData) -> None:
        """Repeat the headline rows with every further seed of ``--seeds``."""
        for row in self.headline_rows(target):
            row["headline"] = True
            for seed in self.args.seeds[1:]:
                if row["method"] == QALORA:
                    self.qalora_seed(target, row, seed)
                else:
                    self.baseline_seed(target, row, seed)

    # ---------------------------------------------------------------- all

    def run_target(self, target: TargetData) -> None:
        """Every row of one target, in order: untrained rows, LoRA, QLoRA, QA-LoRA, and
        the extra seeds of the headline rows."""
        phases = [
            ("base rows", self.base_rows, ()),
            ("LoRA", self.tune_baseline, (LORA_PTQ,)),
            ("QLoRA", self.tune_baseline, (QLORA_PTQ,)),
            ("QA-LoRA", self.qalora_rows, ()),
        ]
        if self.args.packaged_defaults:
            phases.append(("QA-LoRA packaged defaults", self.packaged_defaults_rows, ()))
        if target.name in self.args.seed_targets and len(self.args.seeds) > 1:
            phases.append(("seeds", self.seed_headline, ()))
        for phase, work, extra in phases:
            start = time.perf_counter()
            work(target, *extra)
            seconds = time.perf_counter() - start
            self.phase_seconds[f"{target.name}: {phase}"] = seconds
            _log(f"{target.name}: {phase} done in {seconds:.0f}s")
