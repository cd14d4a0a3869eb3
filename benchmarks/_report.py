"""What the benchmark scripts share: the machine's name, the packaged configs and writing
their outputs."""

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence


def packaged_config(name: str) -> Any:
    """A packaged config (``configs/<name>.yaml``) as OmegaConf reads it, unresolved."""
    from omegaconf import OmegaConf

    from qalora_tune.recipe_utils import resolve_config

    return OmegaConf.load(resolve_config(name))


def cpu_model_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# the environment as the user set it: inductor writes TORCHINDUCTOR_CACHE_DIR into
# os.environ itself once it compiles, so it is read here, at import, before any compile
_ENVIRONMENT_AT_START = dict(os.environ)


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that reproduces this run: the ``QALORA_TUNE_*`` variables set in the
    environment (they switch code paths) and ``TORCHINDUCTOR_CACHE_DIR`` (compile times
    depend on it), as they were when this module was imported; ``python``, the script and
    its arguments, each quoted for a POSIX shell where it needs it (a case name with
    spaces)."""
    switches = [f"{name}={shlex.quote(value)}" for name, value in sorted(_ENVIRONMENT_AT_START.items())
                if name.startswith("QALORA_TUNE_") or name == "TORCHINDUCTOR_CACHE_DIR"]
    return " ".join([*switches, "python", shlex.quote(script), *map(shlex.quote, argv)])


def write_outputs(json_path: Optional[Path], markdown_path: Optional[Path], report: Any,
                  markdown: str, indent: int = 2) -> None:
    """Write ``report`` as JSON and ``markdown`` to the paths given (``None`` skips one),
    creating their folders."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=indent, default=str) + "\n")
    if markdown_path:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(markdown)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json``, ``--markdown`` and ``--plot``: where a benchmark writes its report."""
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)


def parse_with_quick(parser: argparse.ArgumentParser, quick_defaults: Dict[str, Any],
                     argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` (default: the command line); ``--quick`` swaps in ``quick_defaults``,
    and options given explicitly still win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**quick_defaults)
    return parser.parse_args(argv)


def publish(report: Any, markdown: str, args: argparse.Namespace, plot: Any = None) -> None:
    """Print ``markdown``, write ``args.json``/``args.markdown``, and ``plot(report, args.plot)``
    when a plot path was given."""
    print(markdown)
    write_outputs(args.json, args.markdown, report, markdown, indent=1)
    if args.plot and plot is not None:
        plot(report, args.plot)
