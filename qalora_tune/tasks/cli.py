"""``qalora-tune export-task`` and ``qalora-tune task-info``: task packages from the shell.

    qalora-tune export-task runs/alpaca/epoch_0/merged_int4 tasks/alpaca --base models/base_int4
    qalora-tune task-info tasks/alpaca --base models/base_int4
"""

import argparse
import json
from typing import Any

from qalora_tune.tasks.base_layers import fingerprint_layers, read_merged_base
from qalora_tune.tasks.zero_table import export_task_from_merged, read_task_package

__all__ = ["add_task_commands", "run_task_command"]

TASK_COMMANDS = ("export-task", "task-info")


def add_task_commands(commands: Any) -> None:
    """Add the task subcommands to ``qalora-tune``'s subparsers."""
    export = commands.add_parser(
        "export-task",
        help="write a merged_int4/ model's zero points as a task package",
        description="A task package holds a merged QA-LoRA task's zero points and the "
        "fingerprint of its base's codes and scales; qalora_tune.load_merged(BASE, task=...) "
        "and model.load_task(...) apply it to any merged model of the same base.",
    )
    export.add_argument("merged_dir", help="the task's merged_int4/ directory")
    export.add_argument("task_dir", help="the task package directory to write")
    export.add_argument("--name", help="the task's name (default: the task_dir's name)")
    export.add_argument("--base", help="the base it is for: refused if the codes or scales differ")
    export.add_argument("--force", action="store_true", help="replace a qalora-tune output in task_dir")
    info = commands.add_parser("task-info", help="describe a task package (and check it against a base)")
    info.add_argument("task_dir", help="a task package directory")
    info.add_argument("--base", help="a merged_int4/ directory to check the package against")


def run_task_command(args: argparse.Namespace) -> str:
    """Run ``export-task`` or ``task-info``; returns what to print.

    Raises:
        ValueError, FileNotFoundError: with a one-line message.
    """
    if args.command == "export-task":
        metadata = export_task_from_merged(
            args.merged_dir, args.task_dir, name=args.name, overwrite=args.force, base_dir=args.base
        )
        size = metadata["size"]
        return (
            f"wrote task {metadata['name']!r} to {args.task_dir}: {len(metadata['layers'])} layers, "
            f"{size['file_bytes']} bytes ({size['bits_per_quantized_parameter']:.3f} bits per "
            f"quantized weight); base {metadata['base']['fingerprint']}"
        )
    package = read_task_package(args.task_dir)
    summary = {
        "name": package.name,
        "fingerprint": package.base["fingerprint"],
        "group_size": package.base["group_size"],
        "bits": package.base["bits"],
        "zero_dtype": package.metadata["zero_dtype"],
        "layers": len(package.zeros),
        "size": package.metadata.get("size"),
        "config": package.base["config"],
    }
    if args.base:
        fits = fingerprint_layers(read_merged_base(args.base)[1]) == package.base["fingerprint"]
        summary["fits_base"] = {"base": args.base, "fits": fits}
    return json.dumps(summary, indent=2)
