"""``qalora-tune``: list and copy the packaged configs.

    qalora-tune configs                      # names accepted by --config
    qalora-tune cp llama2_7B_qalora my.yaml  # a copy to edit, then --config my.yaml
"""

import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from qalora_tune.recipe_utils import packaged_config_names, resolve_config

__all__ = ["main"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="qalora-tune", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("configs", help="list the packaged configs")
    copy = commands.add_parser("cp", help="copy a packaged config to edit it")
    copy.add_argument("name", help="packaged config name, e.g. llama2_7B_qalora")
    copy.add_argument("destination", help="file or directory to copy it to")
    args = parser.parse_args(argv)
    if args.command == "configs":
        print("\n".join(packaged_config_names()))
        return 0
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


if __name__ == "__main__":
    sys.exit(main())
