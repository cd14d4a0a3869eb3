"""A character-level tokenizer for the embedded tiny task, saved as a small JSON file.

The file is named :data:`TOKENIZER_FILENAME` (``tiny_tokenizer.json``) and has this
project's own format, so it cannot be mistaken for a Hugging Face ``tokenizer.json``::

    {"format": "qalora_tune.tiny_tokenizer", "version": 1,
     "special_tokens": ["<pad>", "<bos>", "<eos>"], "alphabet": "0123...", ...}

Ids ``0, 1, 2`` are ``<pad>``, ``<bos>``, ``<eos>``; character ``alphabet[i]`` is id
``3 + i``. The class follows torchtune's ``ModelTokenizer`` protocol (``encode``,
``decode``, ``tokenize_messages``, ``max_seq_len``) and is a torchtune message transform
(``__call__``), so torchtune's text datasets can use it.
"""

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from qalora_tune._files import read_json
from qalora_tune.errors import UserValueError

__all__ = [
    "DEFAULT_ALPHABET",
    "TOKENIZER_FILENAME",
    "TinyTokenizer",
    "tiny_tokenizer",
]

TOKENIZER_FILENAME = "tiny_tokenizer.json"
"""File name of the tokenizer inside a tiny base's checkpoint directory."""

DEFAULT_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz+-*=<>|,.:;?!()[] "
"""Characters of the embedded task (digits, lower-case letters, punctuation, space)."""

_FORMAT = "qalora_tune.tiny_tokenizer"
_VERSION = 1
_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


class TinyTokenizer:
    """Character-level tokenizer: one id per character plus ``<pad>``, ``<bos>``, ``<eos>``.

    Args:
        alphabet (str): the characters, each once; ``alphabet[i]`` gets id ``3 + i``.
        max_seq_len (int, optional): if set, :meth:`tokenize_messages` truncates to it.

    Raises:
        ValueError: if ``alphabet`` is empty or repeats a character, or ``max_seq_len``
            is not positive.
    """

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __init__(self, alphabet: str = DEFAULT_ALPHABET, max_seq_len: Optional[int] = None):
        if not alphabet:
            raise UserValueError("the tokenizer alphabet must not be empty")
        if len(set(alphabet)) != len(alphabet):
            raise UserValueError(f"the tokenizer alphabet repeats characters: {alphabet!r}")
        if max_seq_len is not None and max_seq_len <= 0:
            raise UserValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.alphabet = alphabet
        self.max_seq_len = max_seq_len
        self._char_to_id = {c: i + len(_SPECIAL_TOKENS) for i, c in enumerate(alphabet)}
        self.special_tokens: Dict[str, int] = {t: i for i, t in enumerate(_SPECIAL_TOKENS)}

    @property
    def vocab_size(self) -> int:
        """Number of ids: the three special tokens plus one per character."""
        return len(_SPECIAL_TOKENS) + len(self.alphabet)

    # ------------------------------------------------------------------ text

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Encode a string, one id per character.

        Args:
            text (str): characters from the alphabet.
            add_bos (bool): prepend ``bos_id``.
            add_eos (bool): append ``eos_id``.

        Returns:
            List[int]: ``len(text) + add_bos + add_eos`` ids.

        Raises:
            ValueError: if ``text`` has a character outside the alphabet.
        """
        try:
            ids = [self._char_to_id[c] for c in text]
        except KeyError as err:
            raise UserValueError(
                f"character {err.args[0]!r} is not in the tiny tokenizer's alphabet "
                f"{self.alphabet!r}"
            ) from None
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode ids back to a string.

        Args:
            ids (Sequence[int]): token ids.
            skip_special_tokens (bool): drop ``<pad>``, ``<bos>``, ``<eos>``; otherwise
                they are written by name.

        Returns:
            str: the text.

        Raises:
            ValueError: for an id outside ``[0, vocab_size)``.
        """
        n_special = len(_SPECIAL_TOKENS)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise UserValueError(f"token id {i} is outside [0, {self.vocab_size})")
            if i < n_special:
                if not skip_special_tokens:
                    out.append(_SPECIAL_TOKENS[i])
            else:
                out.append(self.alphabet[i - n_special])
        return "".join(out)

    # ------------------------------------------------------------------ torchtune messages

    def tokenize_messages(
        self, messages: Sequence[Any], add_end_tokens: bool = True
    ) -> Tuple[List[int], List[bool]]:
        """Tokenize torchtune ``Message`` objects: their text concatenated, no chat template.

        Args:
            messages (Sequence[torchtune.data.Message]): the conversation.
            add_end_tokens (bool): append ``eos_id`` (masked like the last message).

        Returns:
            Tuple[List[int], List[bool]]: tokens and mask of equal length ``L``, starting
            with ``bos_id``; ``mask[i]`` is True where the token is not trained on
            (``<bos>`` and masked messages). Truncated to ``max_seq_len`` if set.
        """
        tokens = [self.bos_id]
        mask = [True]
        for message in messages:
            text = "".join(
                item["content"] for item in message.content if item["type"] == "text"
            )
            ids = self.encode(text, add_bos=False, add_eos=False)
            tokens.extend(ids)
            mask.extend([message.masked] * len(ids))
        if add_end_tokens:
            tokens.append(self.eos_id)
            mask.append(messages[-1].masked if messages else True)
        if self.max_seq_len is not None:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """torchtune transform: ``sample["messages"]`` -> ``sample["tokens"]``, ``sample["mask"]``."""
        sample = dict(sample)
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_end_tokens=not inference)
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample

    # ------------------------------------------------------------------ files

    def save(self, path: str) -> str:
        """Write the tokenizer to ``path`` (a file, or a directory to hold ``tiny_tokenizer.json``).

        Returns:
            str: the file written.
        """
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILENAME)
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "special_tokens": list(_SPECIAL_TOKENS),
            "alphabet": self.alphabet,
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        return path

    @classmethod
    def load(cls, path: str, max_seq_len: Optional[int] = None) -> "TinyTokenizer":
        """Read a tokenizer written by :meth:`save`.

        Args:
            path (str): the file, or a checkpoint directory holding ``tiny_tokenizer.json``.
            max_seq_len (int, optional): truncation length for :meth:`tokenize_messages`.

        Raises:
            ValueError: if the file is missing or is not a tiny tokenizer file.
        """
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILENAME)
        if not os.path.isfile(path):
            raise UserValueError(f"no tiny tokenizer file at {path!r}")
        payload = read_json(path, "tokenizer.path", "set tokenizer.path to a tiny_tokenizer.json")
        if payload.get("format") != _FORMAT:
            raise UserValueError(
                f"{path!r} is not a tiny tokenizer file (expected format {_FORMAT!r})"
            )
        if payload.get("version") != _VERSION or payload.get("special_tokens") != list(
            _SPECIAL_TOKENS
        ):
            raise UserValueError(f"{path!r}: unsupported tiny tokenizer version or special tokens")
        if not isinstance(payload.get("alphabet"), str):
            raise UserValueError(f"{path!r}: the tiny tokenizer has no alphabet text")
        return cls(payload["alphabet"], max_seq_len=max_seq_len)


def tiny_tokenizer(path: str, max_seq_len: Optional[int] = None) -> TinyTokenizer:
    """torchtune ``_component_`` builder: load the tiny tokenizer.

    Args:
        path (str): ``tiny_tokenizer.json``, or the checkpoint directory holding it.
        max_seq_len (int, optional): truncation length for message tokenization.

    Returns:
        TinyTokenizer: the loaded tokenizer.
    """
    return TinyTokenizer.load(path, max_seq_len=max_seq_len)
