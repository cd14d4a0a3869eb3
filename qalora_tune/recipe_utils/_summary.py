"""The end-of-run summary of a fine-tuning run: validation metrics and where the outputs are."""

import json
from pathlib import Path
from typing import Dict, List, Optional

from qalora_tune._files import read_json
from qalora_tune.recipe_utils._merge_report import summarize_report

__all__ = ["format_metrics", "summary_json", "summary_lines"]


def format_metrics(metrics: Dict[str, float]) -> str:
    """``loss ..., perplexity ..., accuracy ..., exact match ...`` on one line."""
    return (
        f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.3f}, "
        f"accuracy {metrics['accuracy']:.2%}, exact match {metrics['exact_match']:.2%}"
    )


def summary_lines(metrics: Dict[str, Dict[str, float]], latest: Optional[Path]) -> List[str]:
    """The summary's lines: a table of ``metrics`` per model, then the newest epoch's
    adapter and merged model (its size, files, and the merge's two figures)."""
    lines = ["", "QA-LoRA summary"]
    if metrics:
        lines.append(
            f"  {'model (validation)':<22}{'loss':>9}{'perplexity':>12}{'accuracy':>10}"
            f"{'exact match':>13}"
        )
        for name, m in metrics.items():
            lines.append(
                f"  {name:<22}{m['loss']:>9.4f}{m['perplexity']:>12.4f}"
                f"{m['accuracy']:>10.2%}{m['exact_match']:>13.2%}"
            )
    lines.append(f"  outputs: {latest}" if latest else "  no outputs written")
    if latest is not None:
        lines.append(f"    adapter: {latest / 'adapter'}")
        merged = latest / "merged_int4"
        if merged.is_dir():
            report = read_json(merged / "merge_report.json", "the merge report")
            size = report["size"]
            lines.append(
                f"    merged int4: {merged} ({size['bits_per_quantized_parameter']:.2f}"
                f" bits per quantized weight, {size.get('shards', 1)} file(s))"
            )
            lines.append(f"      {summarize_report(report)}")
            if "format" in report:  # written since merged_format exists
                lines.append(f"    merged format: {report['format']}, runs on {report['runs_on']}")
    return lines


def summary_json(metrics: Dict[str, Dict[str, float]], latest: Optional[Path]) -> str:
    """``summary.json``'s text."""
    return json.dumps({"metrics": metrics, "outputs": str(latest)}, indent=2)

