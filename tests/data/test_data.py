"""text_file_dataset (train / held-out tail, blocks) and text_tokenizer (tokenizer.json)."""

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from qalora_tune.data import TextBlockDataset, text_file_dataset, text_tokenizer
from tests.data.char_tokenizer import CharTokenizer

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
TINYSTORIES_TOKENIZER = SHARED / "models" / "tinystories656K" / "tokenizer.json"
needs_tokenizer = pytest.mark.skipif(
    not TINYSTORIES_TOKENIZER.is_file(),
    reason=f"needs the reference tokenizer {TINYSTORIES_TOKENIZER}",
)


@pytest.fixture
def text_path(tmp_path):
    lines = [f"line {i:04d} of the story.\n" for i in range(200)]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _ids(dataset):
    return [t for i in range(len(dataset)) for t in dataset[i]["tokens"]]


def test_train_and_validation_are_disjoint_and_validation_is_the_tail(text_path):
    text = text_path.read_text()
    tok = CharTokenizer()
    block = 16
    train = text_file_dataset(tok, str(text_path), block_size=block, split="train", val_fraction=0.1)
    val = text_file_dataset(tok, str(text_path), block_size=block, split="validation", val_fraction=0.1)

    train_text = tok.decode(_ids(train))
    val_text = tok.decode(_ids(val))
    # the split is at a line break: train is a prefix of whole lines, validation the tail
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    assert 0 < cut < len(text) and text[cut - 1] == "\n"
    assert train_text == text[: len(train_text)] and len(train_text) <= cut
    assert val_text == text[cut : cut + len(val_text)] and len(val_text) > 0
    # only the last incomplete block is dropped (BOS and EOS frame each split's stream)
    assert len(train_text) > cut + 2 - block - 2
    assert len(val_text) > len(text) - cut + 2 - block - 2
    # no line (all lines of the file are distinct) appears in both splits' blocks
    train_lines, val_lines = set(train_text.splitlines()), set(val_text.splitlines())
    assert len(train_lines) > 100 and len(val_lines) > 10
    assert train_lines.isdisjoint(val_lines)
    # the held-out tail is about val_fraction of the characters (up to one line)
    assert abs((len(text) - cut) - 0.1 * len(text)) <= len(text.splitlines()[0]) + 1


def test_blocks_have_block_size_tokens_and_labels_equal_tokens(text_path):
    tok = CharTokenizer()
    text = text_path.read_text()
    cut = text.rfind("\n", 0, int(len(text) * 0.95)) + 1
    stream = tok.encode(text[:cut])
    for block_size in (2, 7, 128):
        dataset = text_file_dataset(tok, str(text_path), block_size=block_size)
        assert isinstance(dataset, TextBlockDataset)
        assert len(dataset) == len(stream) // block_size
        for index in (0, len(dataset) - 1):
            item = dataset[index]
            assert len(item["tokens"]) == block_size
            assert item["labels"] == item["tokens"]
            assert item["labels"] is not item["tokens"]
            assert item["tokens"] == stream[index * block_size : (index + 1) * block_size]
    assert dataset[0]["tokens"][0] == tok.bos_id  # the split's stream starts with BOS


def test_max_chars_limits_the_split(text_path):
    tok = CharTokenizer()
    dataset = text_file_dataset(tok, str(text_path), block_size=10, max_chars=98)
    assert len(dataset) == (98 + 2) // 10
    assert tok.decode(_ids(dataset)) == text_path.read_text()[:98]


@pytest.mark.parametrize("split", ["test", "valid", "Train"])
def test_unknown_split_raises(text_path, split):
    with pytest.raises(ValueError, match="split must be 'train' or 'validation'"):
        text_file_dataset(CharTokenizer(), str(text_path), split=split)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_validation_fraction_outside_the_open_unit_interval_raises(text_path, fraction):
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        text_file_dataset(CharTokenizer(), str(text_path), val_fraction=fraction)


def test_text_shorter_than_a_block_raises(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny\ntext\n")
    with pytest.raises(ValueError, match="fewer than block_size=128"):
        text_file_dataset(CharTokenizer(), str(path), block_size=128)
    with pytest.raises(ValueError, match="block_size must be at least 2"):
        text_file_dataset(CharTokenizer(), str(path), block_size=1)


def test_missing_text_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.path"):
        text_file_dataset(CharTokenizer(), str(tmp_path / "absent.txt"))


# ---------------------------------------------------------------------- tokenizer

STORY = "Once upon a time, there was a little girl named Lily. She liked to play."


@needs_tokenizer
def test_tokenizer_without_prepend_space_has_no_leading_metaspace():
    raw = Tokenizer.from_file(str(TINYSTORIES_TOKENIZER))
    tok = text_tokenizer(str(TINYSTORIES_TOKENIZER), prepend_space=False)
    ids = tok.encode(STORY, add_bos=False, add_eos=False)
    first = raw.id_to_token(ids[0])
    assert not first.startswith("▁"), first
    # spaces inside the text are still "▁" (this BPE attaches them to word ends)
    assert any("▁" in raw.id_to_token(i) for i in ids)
    assert tok.decode(ids) == STORY
    # the default keeps the SentencePiece-style prefix: one extra leading "▁" token
    default = text_tokenizer(str(TINYSTORIES_TOKENIZER))
    default_ids = default.encode(STORY, add_bos=False, add_eos=False)
    assert raw.id_to_token(default_ids[0]) == "▁"
    assert default_ids[1:] == ids
    assert default.decode(default_ids) == STORY


@needs_tokenizer
@pytest.mark.parametrize(
    "text",
    [STORY, "Tom said, \"Hi!\"\nThe end.", "a  b   c", "The cat's hat: 42 times, yes?"],
)
def test_tokenizer_round_trips_text(text):
    tok = text_tokenizer(str(TINYSTORIES_TOKENIZER), prepend_space=False)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.vocab_size == 2048


@needs_tokenizer
def test_bos_eos_come_from_generation_config(tmp_path):
    shutil.copy(TINYSTORIES_TOKENIZER, tmp_path / "tokenizer.json")
    # no generation_config.json: llama defaults
    tok = text_tokenizer(str(tmp_path / "tokenizer.json"), prepend_space=False)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 7, "eos_token_id": 9}))
    tok = text_tokenizer(str(tmp_path / "tokenizer.json"), prepend_space=False)
    assert (tok.bos_id, tok.eos_id) == (7, 9)
    body = tok.encode("Once upon a time", add_bos=False, add_eos=False)
    assert tok.encode("Once upon a time") == [7] + body + [9]
    assert tok.encode("Once upon a time", add_bos=True, add_eos=False) == [7] + body
    # the real checkpoint's generation_config.json
    real = json.loads((TINYSTORIES_TOKENIZER.parent / "generation_config.json").read_text())
    tok = text_tokenizer(str(TINYSTORIES_TOKENIZER))
    assert (tok.bos_id, tok.eos_id) == (real["bos_token_id"], real["eos_token_id"])


@needs_tokenizer
def test_max_seq_len_truncates():
    tok = text_tokenizer(str(TINYSTORIES_TOKENIZER), prepend_space=False, max_seq_len=5)
    ids = tok.encode(STORY)
    assert len(ids) == 5 and ids[0] == tok.bos_id


def test_missing_tokenizer_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        text_tokenizer(str(tmp_path / "tokenizer.json"))
