"""Progress bars for the long steps of a real-size run.

Loading and quantizing a 7B base, calibrating GPTQ, merging and exporting take minutes on
a CPU; each shows a bar. On a terminal the bar redraws in place; in a log file (no
terminal) it writes a line every ``LOG_INTERVAL_S`` seconds, so the log still shows that
the run is alive and how fast it goes. Only rank 0 of a multi-process run shows bars.
"""

import os
import sys
import weakref
from typing import Any, Optional

from tqdm import tqdm

__all__ = ["LOG_INTERVAL_S", "close_progress_bars", "progress_bar"]

LOG_INTERVAL_S = 15.0

_open_bars: "weakref.WeakSet[tqdm]" = weakref.WeakSet()


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def progress_bar(total: Optional[float], desc: str, unit: str = "it", **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, off on ranks other than 0 and when ``QALORA_TUNE_PROGRESS=0``.

    Args:
        total (float, optional): the amount of work (None if unknown).
        desc (str): what is being done.
        unit (str): ``"B"`` scales to kB/MB/GB.
        **kwargs: any other tqdm argument.
    """
    interactive = sys.stderr.isatty()
    disabled = not _is_rank_zero() or os.environ.get("QALORA_TUNE_PROGRESS", "1") == "0"
    options = dict(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1000,
        file=sys.stderr,
        disable=disabled,
        mininterval=0.2 if interactive else LOG_INTERVAL_S,
        dynamic_ncols=interactive,
        leave=True,
    )
    options.update(kwargs)
    bar = tqdm(**options)
    _open_bars.add(bar)
    return bar


def close_progress_bars() -> None:
    """Close every bar still open (an error interrupted its step), so that what is
    printed next starts on a line of its own."""
    for bar in list(_open_bars):
        bar.close()
        _open_bars.discard(bar)
