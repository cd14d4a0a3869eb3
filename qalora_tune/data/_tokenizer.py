"""A Hugging Face ``tokenizer.json`` as a torchtune-style text tokenizer."""

import json
from pathlib import Path
from typing import List, Optional

from tokenizers import Tokenizer, normalizers

from qalora_tune._files import read_json, read_text
from qalora_tune.errors import UserFileNotFoundError, UserValueError

__all__ = ["TextTokenizer", "text_tokenizer"]


class TextTokenizer:
    """Encode/decode text with a ``tokenizer.json``, the interface torchtune text datasets use.

    Args:
        path (str): the ``tokenizer.json`` file.
        bos_id (int): beginning-of-sequence id.
        eos_id (int): end-of-sequence id.
        prepend_space (bool): keep a SentencePiece-style ``Prepend("▁")`` normalizer; some
            models (e.g. TinyStories-656K) were trained without it.
        max_seq_len (int, optional): truncate encoded sequences to this many tokens.
    """

    def __init__(
        self,
        path: str,
        bos_id: int,
        eos_id: int,
        prepend_space: bool = True,
        max_seq_len: Optional[int] = None,
    ):
        self._tokenizer = Tokenizer.from_file(str(path))
        if not prepend_space:
            self._drop_prepend_normalizer()
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = 0
        self.max_seq_len = max_seq_len
        self.vocab_size = self._tokenizer.get_vocab_size()

    def _drop_prepend_normalizer(self) -> None:
        spec = json.loads(self._tokenizer.to_str()).get("normalizer") or {}
        parts = spec.get("normalizers", [spec]) if spec else []
        kept = [p for p in parts if p.get("type") != "Prepend"]
        rebuilt = json.loads(self._tokenizer.to_str())
        rebuilt["normalizer"] = {"type": "Sequence", "normalizers": kept} if kept else None
        self._tokenizer = Tokenizer.from_str(json.dumps(rebuilt))
        if self._tokenizer.normalizer is None:
            self._tokenizer.normalizer = normalizers.Sequence([])

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Token ids of ``text``, optionally framed by BOS/EOS, truncated to ``max_seq_len``."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        ids = ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])
        return ids[: self.max_seq_len] if self.max_seq_len else ids

    def decode(self, ids: List[int]) -> str:
        """Text of ``ids`` (special tokens dropped)."""
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def text_tokenizer(
    path: str, prepend_space: bool = True, max_seq_len: Optional[int] = None
) -> TextTokenizer:
    """Build a :class:`TextTokenizer`, reading BOS/EOS ids from the neighbouring
    ``generation_config.json`` (defaults 1 and 2).

    Args:
        path (str): the ``tokenizer.json`` file of a checkpoint.
        prepend_space (bool): see :class:`TextTokenizer`.
        max_seq_len (int, optional): truncation length.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserFileNotFoundError(f"tokenizer file {path} not found; set tokenizer.path")
    generation = path.parent / "generation_config.json"
    ids = read_json(generation, "the tokenizer's generation_config.json", required=False) or {}
    bos_id, eos_id = ids.get("bos_token_id", 1), ids.get("eos_token_id", 2)
    for name, value in (("bos_token_id", bos_id), ("eos_token_id", eos_id)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserValueError(
                f"{generation} has {name}={value!r}, not a token id; fix or remove the file"
            )
    try:
        text = read_text(path, "tokenizer.path")
        Tokenizer.from_str(text)
    except UserValueError:
        raise
    except Exception as error:  # tokenizers raises a bare Exception for a bad file
        raise UserValueError(
            f"tokenizer.path {path} is not a Hugging Face tokenizer.json "
            f"({' '.join(str(error).split())[:160]}); set tokenizer.path to the base model's "
            "tokenizer.json"
        ) from None
    return TextTokenizer(
        str(path),
        bos_id=bos_id,
        eos_id=eos_id,
        prepend_space=prepend_space,
        max_seq_len=max_seq_len,
    )
