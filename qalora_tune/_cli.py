"""``qalora-tune``: list and copy the packaged configs, export a merged model to GGUF,
export and inspect task packages.

    qalora-tune configs                      # names accepted by --config
    qalora-tune cp llama2_7B_qalora my.yaml  # a copy to edit, then --config my.yaml
    qalora-tune export-gguf MERGED_DIR OUT.gguf [--dense-type f16|f32] [--linear-type q4_1|f32] [--force]
    qalora-tune export-task MERGED_DIR TASK_DIR [--base BASE_DIR] [--name NAME] [--force]
    qalora-tune task-info TASK_DIR [--base BASE_DIR]
"""

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from qalora_tune.recipe_utils import packaged_config_names, resolve_config
from qalora_tune.tasks.cli import TASK_COMMANDS, add_task_commands, run_task_command

__all__ = ["main"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="qalora-tune", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("configs", help="list the packaged configs")
    copy = commands.add_parser("cp", help="copy a packaged config to edit it")
    copy.add_argument("name", help="packaged config name, e.g. llama2_7B_qalora")
    copy.add_argument("destination", help="file or directory to copy it to")
    _add_export_gguf_parser(commands)
    add_task_commands(commands)  # task packages: qalora_tune.tasks.cli
    args = parser.parse_args(argv)
    if args.command in TASK_COMMANDS:
        return _task_command(args)
    if args.command == "configs":
        print("\n".join(packaged_config_names()))
        return 0
    if args.command == "export-gguf":
        return _export_gguf(args)
    try:
        source = Path(resolve_config(args.name))
    except ValueError as error:
        print(f"qalora-tune: error: {error}", file=sys.stderr)
        return 1
    destination = Path(args.destination)
    if destination.is_dir():
        destination = destination / source.name
    if destination.exists():
        print(f"qalora-tune: error: {destination} exists; choose another name", file=sys.stderr)
        return 1
    shutil.copyfile(source, destination)
    print(f"copied {source.name} to {destination}")
    return 0


def _task_command(args) -> int:
    try:
        print(run_task_command(args))
    except (ValueError, TypeError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"qalora-tune: error: {message}", file=sys.stderr)
        return 1
    return 0


def _add_export_gguf_parser(commands) -> None:
    export = commands.add_parser(
        "export-gguf",
        help="write a merged_int4/ model as a GGUF file for llama.cpp / ollama",
        description="Int4 linears become Q4_1 (exact up to fp16 rounding of scale and "
        "minimum) where group size and row length are multiples of 32, else dequantized F32.",
    )
    export.add_argument("merged_dir", help="a merged_int4/ directory")
    export.add_argument("out", help="the .gguf file to write")
    export.add_argument(
        "--dense-type", choices=("f32", "f16"), default="f32",
        help="embeddings and a dense output projection (default f32; norms are always f32)",
    )
    export.add_argument(
        "--linear-type", choices=("q4_1", "f32"), default="q4_1",
        help="quantized linears: Q4_1 where exact (default), or all dequantized to F32",
    )
    export.add_argument(
        "--space-prefix", choices=("auto", "yes", "no"), default="auto",
        help="whether llama.cpp prepends '\u2581' to text (default: as the tokenizer file "
        "says; 'no' for models trained without it, e.g. TinyStories-656K)",
    )
    export.add_argument("--force", action="store_true", help="replace an existing OUT")
    export.add_argument("--report", help="also write the export report (JSON) to this file")


def _export_gguf(args) -> int:
    from qalora_tune.export import export_gguf

    space_prefix = {"auto": None, "yes": True, "no": False}[args.space_prefix]
    try:
        report = export_gguf(
            args.merged_dir, args.out, dense_type=args.dense_type,
            linear_type=args.linear_type, add_space_prefix=space_prefix, overwrite=args.force,
        )
    except (ValueError, TypeError, OSError, ImportError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"qalora-tune: error: {message}", file=sys.stderr)
        return 1
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    counts = ", ".join(f"{n} {t}" for t, n in sorted(report["tensor_counts"].items()))
    print(
        f"wrote {report['gguf']}: {report['file_bytes']} bytes, {report['parameters']} "
        f"parameters ({report['bits_per_weight']:.2f} bits per weight); tensors: {counts}; "
        f"Q4_1 max relative weight error {report['q4_1_max_relative_error']:.3g} "
        f"(fp16 rounding bound {report['q4_1_relative_bound']:.3g})"
    )
    for name, entry in report["tensors"].items():
        if "reason" in entry and report["linear_type"] == "q4_1":
            print(f"  {name}: F32 ({entry['reason']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
