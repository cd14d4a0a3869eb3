import json

import pytest
from torchtune.data import Message

from qalora_tune.tiny import TOKENIZER_FILENAME, TinyTokenizer, tiny_tokenizer


def test_round_trip_and_special_ids():
    tok = TinyTokenizer()
    text = "qzk bma=417 203"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2 and tok.pad_id == 0
    assert len(ids) == len(text) + 2 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False, add_eos=False) == ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + text + "<eos>"


def test_user_errors_raise_value_error(tmp_path):
    tok = TinyTokenizer()
    with pytest.raises(ValueError, match="not in the tiny tokenizer"):
        tok.encode("ABC")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="repeats"):
        TinyTokenizer("aa")
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(ValueError, match="not a tiny tokenizer"):
        TinyTokenizer.load(str(bad))
    with pytest.raises(ValueError, match="no tiny tokenizer"):
        tiny_tokenizer(str(tmp_path / "missing.json"))


def test_save_load_file_and_directory(tmp_path):
    tok = TinyTokenizer("abc=0 ")
    written = tok.save(str(tmp_path))
    assert written.endswith(TOKENIZER_FILENAME)
    for path in (written, str(tmp_path)):
        loaded = tiny_tokenizer(path, max_seq_len=7)
        assert loaded.alphabet == tok.alphabet and loaded.max_seq_len == 7
        assert loaded.encode("cab=0") == tok.encode("cab=0")


def test_tokenize_messages_masks_the_prompt_and_truncates():
    tok = TinyTokenizer(max_seq_len=None)
    messages = [
        Message(role="user", content="ab=", masked=True),
        Message(role="assistant", content="12"),
    ]
    tokens, mask = tok.tokenize_messages(messages)
    assert tokens == tok.encode("ab=12")
    assert mask == [True, True, True, True, False, False, False]
    sample = tok({"messages": messages})
    assert sample["tokens"] == tokens and sample["mask"] == mask
    short = TinyTokenizer(max_seq_len=4).tokenize_messages(messages)
    assert short == (tokens[:4], mask[:4])
