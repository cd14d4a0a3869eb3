"""Plot the committed performance results into ``docs/results/performance.png``.

    pip install matplotlib
    python benchmarks/plot_performance.py [--results docs/results] [--out docs/results/performance.png]

Left: training tokens/s per method from ``train_*.json`` (``benchmarks/train_throughput.py``),
one group of bars per file. Right: decode and prefill tokens/s per served model from
``decode_cpu.json`` (``benchmarks/decode.py``), eager and compiled. Log scales: the
methods differ by up to two orders of magnitude.
"""

import argparse
import json
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FILES = ("train_cpu.json", "train_cpu_seq512.json", "train_cpu_tinystories656K.json")


def _train_groups(results_dir: Path) -> Dict[str, Dict[str, float]]:
    groups = {}
    for name in TRAIN_FILES:
        path = results_dir / name
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        settings = report["settings"]
        label = f"{settings['shape']}, {settings['batch_size']}x{settings['seq_len']} tokens"
        groups[label] = {m: r["tokens_per_s"] for m, r in report["results"].items()}
    return groups


def _bars(axis, groups: Dict[str, Dict[str, float]], ylabel: str, title: str) -> None:
    names: List[str] = []
    for values in groups.values():
        names += [n for n in values if n not in names]
    width = 0.8 / max(1, len(names))
    for index, name in enumerate(names):
        xs = [g + index * width for g, values in enumerate(groups.values()) if name in values]
        ys = [values[name] for values in groups.values() if name in values]
        axis.bar(xs, ys, width, label=name)
    axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    axis.set_xticklabels(list(groups), fontsize=8)
    axis.set_yscale("log")
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "performance.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (train_axis, decode_axis) = plt.subplots(1, 2, figsize=(14, 5))
    train = _train_groups(args.results)
    cpu = ""
    if train:
        first = json.loads((args.results / TRAIN_FILES[0]).read_text())["environment"]
        cpu = f"{first['cpu']}, {first['threads']} threads"
    _bars(train_axis, train, "training tokens/s (log)", f"One training step, CPU ({cpu})")
    decode_path = args.results / "decode_cpu.json"
    if decode_path.is_file():
        decode = json.loads(decode_path.read_text())
        groups = {}
        for mode, models in decode["results"].items():
            for kind in ("prefill", "decode"):
                groups[f"{kind}, {mode}"] = {
                    decode["models"][m]["title"].split(":")[0].split(" (")[0]: r[f"{kind}_tokens_per_s"]
                    for m, r in models.items()
                    if isinstance(r, dict) and f"{kind}_tokens_per_s" in r
                }
        shape = decode["settings"]["shape"]
        _bars(
            decode_axis, groups, "tokens/s (log)",
            f"Serving, CPU: {shape['num_layers']} llama2-7B layers, vocab {shape['vocab_size']}",
        )
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
