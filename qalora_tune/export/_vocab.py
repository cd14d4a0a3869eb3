"""The tokenizer of a merged directory as llama.cpp vocabulary metadata.

All three tokenizers this project trains with become llama.cpp's ``"llama"`` vocabulary
(SentencePiece-style: ``"▁"`` for spaces, greedy merging of adjacent symbols by token
score, ``<0xXX>`` byte fallback):

- ``tiny_tokenizer.json`` (the embedded task's character tokenizer): ids 0, 1, 2 are
  ``<pad>``, ``<bos>``, ``<eos>`` (control tokens), then one token per character, space
  written as ``"▁"``. No two-character token exists, so every character stays one token.
- ``tokenizer.model`` (SentencePiece, e.g. stories260K and Llama 2): pieces, scores and
  types as SentencePiece stores them, ``add_dummy_prefix`` as the space prefix.
- ``tokenizer.json`` with a byte-fallback BPE model on ``"▁"``-escaped text (e.g.
  TinyStories-656K): a token made by merge number ``r`` scores ``-r``, so the highest
  score is the earliest merge, as in BPE. llama.cpp merges any adjacent pair whose
  concatenation is a token, BPE only listed pairs; the tests measure where that differs.

A tokenizer the model was trained without a leading ``"▁"`` for (TinyStories-656K) needs
``add_space_prefix=False``: the file alone does not say so.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from qalora_tune.tiny.tokenizer import TinyTokenizer

__all__ = ["TOKEN_TYPES", "GGUFVocab", "read_vocab"]

SPACE = "\u2581"  # "▁"
TOKEN_TYPES = {"normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "unused": 5, "byte": 6}
"""llama.cpp's token type numbers (``gguf.TokenType``)."""
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GGUFVocab:
    """Vocabulary metadata for a ``"llama"`` (SentencePiece-style) GGUF tokenizer.

    Attributes:
        source (str): the tokenizer file it was read from.
        tokens (List[str]): token texts by id.
        scores (List[float]): merge priority by id (higher merges first).
        types (List[int]): :data:`TOKEN_TYPES` values by id.
        bos_id, eos_id, unk_id, pad_id (int, optional): special ids (None if absent).
        add_bos (bool), add_eos (bool): whether llama.cpp adds them when tokenizing.
        add_space_prefix (bool): whether llama.cpp prepends ``"▁"`` to the text.
        notes (List[str]): what the conversion could not carry over exactly.
    """

    source: str
    tokens: List[str]
    scores: List[float]
    types: List[int]
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    unk_id: Optional[int] = None
    pad_id: Optional[int] = None
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool = True
    notes: List[str] = field(default_factory=list)

    def pad_to(self, size: int) -> None:
        """Add unused placeholder tokens up to ``size`` (the model's vocabulary size).

        Raises:
            ValueError: if the tokenizer has more tokens than the model has embeddings.
        """
        if len(self.tokens) > size:
            raise ValueError(
                f"{self.source} has {len(self.tokens)} tokens but the model's vocab_size is "
                f"{size}; export a merged directory whose tokenizer matches its config.json"
            )
        for i in range(len(self.tokens), size):
            self.tokens.append(f"[PAD{i}]")
            self.scores.append(-1e9)
            self.types.append(TOKEN_TYPES["unused"])


def read_vocab(merged_dir: Path, add_space_prefix: Optional[bool] = None) -> GGUFVocab:
    """Read the tokenizer files of a merged directory (``tiny_tokenizer.json``, then
    ``tokenizer.model``, then ``tokenizer.json``).

    Args:
        merged_dir (Path): the directory.
        add_space_prefix (bool, optional): override the space prefix the tokenizer file
            implies.

    Returns:
        GGUFVocab: the vocabulary.

    Raises:
        FileNotFoundError: if there is no tokenizer file.
        ValueError: for a tokenizer llama.cpp's ``"llama"`` vocabulary cannot reproduce.
    """
    readers = (
        ("tiny_tokenizer.json", _tiny_vocab),
        ("tokenizer.model", _sentencepiece_vocab),
        ("tokenizer.json", _bpe_vocab),
    )
    for name, reader in readers:
        path = merged_dir / name
        if path.is_file():
            vocab = reader(path)
            if add_space_prefix is not None:
                vocab.add_space_prefix = add_space_prefix
            return vocab
    raise FileNotFoundError(
        f"{merged_dir} has no tokenizer file (tiny_tokenizer.json, tokenizer.model or "
        "tokenizer.json); copy the base model's tokenizer files into it"
    )


def _tiny_vocab(path: Path) -> GGUFVocab:
    tokenizer = TinyTokenizer.load(str(path))
    specials = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    tokens = [name for name, _ in specials] + [
        SPACE if c == " " else c for c in tokenizer.alphabet
    ]
    types = [TOKEN_TYPES["control"]] * len(specials) + [TOKEN_TYPES["normal"]] * len(tokenizer.alphabet)
    return GGUFVocab(
        source=path.name,
        tokens=tokens,
        scores=[0.0] * len(tokens),
        types=types,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        add_space_prefix=False,
        notes=[
            "llama.cpp aborts (std::out_of_range) on text with a character outside the "
            "alphabet, as TinyTokenizer refuses it; drive it with token ids"
        ],
    )


def _sentencepiece_vocab(path: Path) -> GGUFVocab:
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:  # protobuf missing
        raise ValueError(
            f"reading {path} needs the sentencepiece and protobuf packages; "
            f"pip install sentencepiece protobuf ({error})"
        ) from None
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(path.read_bytes())
    # SentencePiece's piece types are numbered as llama.cpp's token types
    tokens = [piece.piece for piece in model.pieces]
    scores = [float(piece.score) for piece in model.pieces]
    types = [int(piece.type) for piece in model.pieces]
    ids: Dict[str, Optional[int]] = {}
    spec = model.trainer_spec
    for name, value in (("bos", spec.bos_id), ("eos", spec.eos_id), ("unk", spec.unk_id), ("pad", spec.pad_id)):
        ids[name] = value if 0 <= value < len(tokens) else None
    if spec.model_type not in (1, 2):  # UNIGRAM, BPE
        raise ValueError(
            f"{path} is a SentencePiece model of type {spec.model_type}; only unigram and BPE "
            "models map to llama.cpp's llama vocabulary"
        )
    return GGUFVocab(
        source=path.name,
        tokens=tokens,
        scores=scores,
        types=types,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        unk_id=ids["unk"],
        pad_id=ids["pad"],
        add_space_prefix=bool(model.normalizer_spec.add_dummy_prefix),
    )


def _bpe_vocab(path: Path) -> GGUFVocab:
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _escapes_spaces(spec):
        raise ValueError(
            f"{path} is not a SentencePiece-style BPE tokenizer (BPE on '\u2581'-escaped text); "
            "llama.cpp's llama vocabulary cannot reproduce it, so it has no GGUF export here"
        )
    vocab: Dict[str, int] = dict(model["vocab"])
    for added in spec.get("added_tokens") or []:
        vocab.setdefault(added["content"], added["id"])
    size = max(vocab.values()) + 1
    tokens: List[Optional[str]] = [None] * size
    for text, i in vocab.items():
        tokens[i] = text
    if any(t is None for t in tokens):
        raise ValueError(f"{path}: token ids are not contiguous from 0; it has no GGUF export here")
    merges = model.get("merges") or []
    rank: Dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    lowest = -float(len(merges) + 1)
    scores = [
        -float(rank[t]) if t in rank else (0.0 if len(t) == 1 else lowest) for t in tokens
    ]
    config = _json_or_empty(path.with_name("tokenizer_config.json"))
    special_ids = {a["id"] for a in spec.get("added_tokens") or [] if a.get("special")}
    unk_id = vocab.get(model.get("unk_token")) if model.get("unk_token") else None
    types = []
    for i, text in enumerate(tokens):
        if i == unk_id:
            types.append(TOKEN_TYPES["unknown"])
        elif i in special_ids:
            types.append(TOKEN_TYPES["control"])
        elif _BYTE_TOKEN.fullmatch(text) and model.get("byte_fallback"):
            types.append(TOKEN_TYPES["byte"])
        else:
            types.append(TOKEN_TYPES["normal"])
    ids = _special_ids(path.parent, config, vocab)
    notes = []
    if not model.get("byte_fallback") or not any(t == TOKEN_TYPES["byte"] for t in types):
        notes.append(
            "no <0xXX> byte tokens: llama.cpp aborts (std::out_of_range) on text with a "
            "character outside the vocabulary, where Hugging Face gives <unk>; drive it with token ids"
        )
    if len(merges) and any(scores[i] == lowest for i in range(size)):
        notes.append("tokens no merge produces are merged last by llama.cpp (never by BPE)")
    return GGUFVocab(
        source=path.name,
        tokens=tokens,  # type: ignore[arg-type]
        scores=scores,
        types=types,
        bos_id=ids.get("bos"),
        eos_id=ids.get("eos"),
        unk_id=unk_id if unk_id is not None else ids.get("unk"),
        pad_id=ids.get("pad"),
        add_bos=bool(config.get("add_bos_token", True)),
        add_eos=bool(config.get("add_eos_token", False)),
        add_space_prefix=_prepends_space(spec),
        notes=notes,
    )


def _escapes_spaces(spec: Dict[str, Any]) -> bool:
    """Whether the tokenizer turns spaces into ``"▁"`` (a Replace normalizer or a
    Metaspace pre-tokenizer) and has no other pre-tokenizer splitting the text."""
    normalizers = _parts(spec.get("normalizer"), "normalizers")
    replaces = any(
        n.get("type") == "Replace" and n.get("pattern", {}).get("String") == " " and n.get("content") == SPACE
        for n in normalizers
    )
    pre = _parts(spec.get("pre_tokenizer"), "pretokenizers")
    metaspace = any(p.get("type") == "Metaspace" for p in pre)
    others = [p for p in pre if p.get("type") not in ("Metaspace",)]
    return (replaces or metaspace) and not others


def _prepends_space(spec: Dict[str, Any]) -> bool:
    normalizers = _parts(spec.get("normalizer"), "normalizers")
    if any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in normalizers):
        return True
    for p in _parts(spec.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always") != "never" and p.get("add_prefix_space", True)
    return False


def _parts(node: Optional[Dict[str, Any]], key: str) -> List[Dict[str, Any]]:
    if not node:
        return []
    return list(node.get(key, [])) if node.get("type") == "Sequence" else [node]


def _json_or_empty(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _special_ids(directory: Path, config: Dict[str, Any], vocab: Dict[str, int]) -> Dict[str, int]:
    """bos/eos ids from ``generation_config.json`` then ``config.json`` (what the training
    tokenizer reads), pad/unk (and missing bos/eos) from the tokenizer config's names."""
    ids: Dict[str, int] = {}
    for name in ("generation_config.json", "config.json"):
        found = _json_or_empty(directory / name)
        for kind in ("bos", "eos", "pad"):
            value = found.get(f"{kind}_token_id")
            if kind not in ids and isinstance(value, int):
                ids[kind] = value
    for kind in ("bos", "eos", "pad", "unk"):
        token = config.get(f"{kind}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if kind not in ids and token in vocab:
            ids[kind] = vocab[token]
    return ids
