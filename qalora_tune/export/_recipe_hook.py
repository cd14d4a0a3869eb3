"""The GGUF step of the recipes (``merged_format=gguf``): export into the merged directory."""

import json
from pathlib import Path
from typing import Any, Callable, Optional

from qalora_tune.export.gguf import export_gguf

__all__ = ["GGUF_NAME", "gguf_finisher"]

GGUF_NAME = "model.gguf"
GGUF_REPORT_NAME = "gguf_report.json"


def gguf_finisher(merged_format: str, cfg_tokenizer: Any) -> Optional[Callable[[Path], None]]:
    """For ``merged_format=gguf``, a function that writes ``model.gguf`` (and its report)
    into a just-written merged directory; None for every other format.

    The tokenizer section's ``prepend_space`` (TinyStories-656K's tokenizer is used
    without the SentencePiece space prefix) is carried into the GGUF vocabulary.
    """
    if merged_format != "gguf":
        return None
    prefix = cfg_tokenizer.get("prepend_space") if hasattr(cfg_tokenizer, "get") else None

    def finish(merged_dir: Path) -> None:
        report = export_gguf(merged_dir, merged_dir / GGUF_NAME, add_space_prefix=prefix)
        (merged_dir / GGUF_REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))

    return finish
