"""Tokenizer files -> llama.cpp "llama" vocabulary metadata (without llama.cpp; the
tokenization itself is compared in a real llama.cpp in test_llamacpp.py)."""

import json
import shutil
from pathlib import Path

import pytest

from qalora_tune.export._vocab import TOKEN_TYPES, read_vocab
from qalora_tune.tiny import TinyTokenizer

SHARED = (Path(__file__).resolve().parents[2] / ".." / "shared").resolve()
requires_shared = pytest.mark.skipif(
    not (SHARED / "models").is_dir(), reason="needs ../shared (real tiny checkpoints and data)"
)


def test_tiny_tokenizer_spaces_become_the_sentencepiece_space(tmp_path):
    TinyTokenizer().save(str(tmp_path))
    vocab = read_vocab(tmp_path)
    tokenizer = TinyTokenizer()
    assert len(vocab.tokens) == tokenizer.vocab_size
    assert vocab.tokens[tokenizer.encode(" ", add_bos=False, add_eos=False)[0]] == "\u2581"
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.unk_id) == (1, 2, 0, None)
    assert vocab.types[:3] == [TOKEN_TYPES["control"]] * 3 and not vocab.add_space_prefix
    vocab.pad_to(60)
    assert vocab.tokens[-1] == "[PAD59]" and vocab.types[-1] == TOKEN_TYPES["unused"]
    with pytest.raises(ValueError, match="vocab_size is 10"):
        vocab.pad_to(10)


@requires_shared
def test_sentencepiece_model_pieces_scores_and_types():
    import sentencepiece

    path = SHARED / "models" / "stories260K"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    vocab = read_vocab(path)  # tokenizer.model is preferred over the tokenizer.json beside it
    assert vocab.source == "tokenizer.model"
    assert vocab.tokens == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert vocab.scores == [sp.get_score(i) for i in range(sp.vocab_size())]
    assert vocab.types[sp.unk_id()] == TOKEN_TYPES["unknown"] and vocab.types[sp.bos_id()] == TOKEN_TYPES["control"]
    assert vocab.types[3 + 10] == TOKEN_TYPES["byte"] and vocab.tokens[13] == "<0x0A>"
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id) == (1, 2, 0, None)
    assert vocab.add_space_prefix  # add_dummy_prefix


@requires_shared
def test_bpe_tokenizer_json_scores_follow_the_merge_order(tmp_path):
    path = SHARED / "models" / "tinystories656K"
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = read_vocab(path)
    assert vocab.source == "tokenizer.json" and len(vocab.tokens) == 2048
    assert all(vocab.tokens[i] == t for t, i in spec["model"]["vocab"].items())
    first = spec["model"]["merges"][0]
    left, right = first.split(" ") if isinstance(first, str) else first
    assert vocab.scores[vocab.tokens.index(left + right)] == 0.0  # the first merge ranks highest
    tenth = spec["model"]["merges"][9]
    left, right = tenth.split(" ") if isinstance(tenth, str) else tenth
    assert vocab.scores[vocab.tokens.index(left + right)] == -9.0
    assert vocab.types[:3] == [TOKEN_TYPES["unknown"], TOKEN_TYPES["control"], TOKEN_TYPES["control"]]
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id) == (1, 2, 0, 0)
    assert vocab.add_space_prefix  # its normalizer prepends "▁" ...
    assert not read_vocab(path, add_space_prefix=False).add_space_prefix  # ... the model was trained without
    # a byte-level (GPT-2 style) BPE has no "▁" escaping: refused in one line
    other = tmp_path / "bytelevel"
    other.mkdir()
    spec = dict(spec, normalizer=None, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False})
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="not a SentencePiece-style BPE tokenizer"):
        read_vocab(other)
    shutil.rmtree(other)
