"""instruct_json_dataset: local Alpaca records, torchtune's Alpaca prompt, response-only labels."""

import json
from pathlib import Path

import pytest
from torchtune.data import AlpacaToMessages

from qalora_tune.data import instruct_json_dataset, text_tokenizer
from tests.data.char_tokenizer import CharTokenizer

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
ALPACA = SHARED / "data" / "alpaca_4500.json"
TINYSTORIES_TOKENIZER = SHARED / "models" / "tinystories656K" / "tokenizer.json"

RECORDS = [
    {"instruction": f"Say the number {i}.", "input": "in words" if i % 2 else "", "output": f"N{i}"}
    for i in range(20)
]


@pytest.fixture
def records_path(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(RECORDS))
    return path


def _prompt(record):
    return AlpacaToMessages()(record)["messages"][0].text_content


def test_prompt_tokens_are_ignored_and_the_response_is_labelled(records_path):
    dataset = instruct_json_dataset(
        CharTokenizer(), str(records_path), split="train", val_fraction=0.25
    )
    assert len(dataset) == 15
    for index in (0, 1):  # without and with an input field (two prompt templates)
        item = dataset[index]
        tokens, labels = item["tokens"], item["labels"]
        prompt = _prompt(RECORDS[index])
        assert len(tokens) == len(labels) == 1 + len(prompt) + len(RECORDS[index]["output"]) + 1
        cut = 1 + len(prompt)  # BOS + prompt
        assert labels[:cut] == [-100] * cut
        assert labels[cut:] == tokens[cut:]  # response and the closing EOS
        assert CharTokenizer.decode(labels[cut:]) == RECORDS[index]["output"]
        assert tokens[-1] == CharTokenizer.eos_id and tokens[0] == CharTokenizer.bos_id
        assert CharTokenizer.decode(tokens[:cut]) == prompt
    assert "### Input:\nin words" in _prompt(RECORDS[1]) and "### Input" not in _prompt(RECORDS[0])


def test_train_on_input_labels_every_token(records_path):
    item = instruct_json_dataset(CharTokenizer(), str(records_path), train_on_input=True)[0]
    assert item["labels"] == item["tokens"]


def test_validation_is_the_tail_of_the_records_and_jsonl_reads_the_same(records_path, tmp_path):
    val = instruct_json_dataset(
        CharTokenizer(), str(records_path), split="validation", val_fraction=0.25
    )
    assert len(val) == 5
    first = val[0]["labels"]
    assert CharTokenizer.decode([t for t in first if t != -100]) == RECORDS[15]["output"]
    lines = tmp_path / "records.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    same = instruct_json_dataset(CharTokenizer(), str(lines), split="validation", val_fraction=0.25)
    assert [same[i] for i in range(5)] == [val[i] for i in range(5)]


def test_column_map_and_truncation(tmp_path):
    path = tmp_path / "renamed.json"
    path.write_text(json.dumps([{"question": "Q?", "context": "", "answer": "yes"}] * 4))
    mapping = {"instruction": "question", "input": "context", "output": "answer"}
    dataset = instruct_json_dataset(CharTokenizer(), str(path), column_map=mapping, max_seq_len=10)
    item = dataset[0]
    assert len(item["tokens"]) == len(item["labels"]) == 10
    assert item["labels"] == [-100] * 10  # the prompt alone is longer: nothing to score


def test_a_torchtune_model_tokenizer_formats_the_messages_itself(records_path):
    class MessagesTokenizer(CharTokenizer):
        def tokenize_messages(self, messages):
            tokens, mask = [], []
            for message in messages:
                ids = [ord(c) for c in message.text_content] + [self.eos_id]
                tokens += ids
                mask += [message.masked] * len(ids)
            return tokens, mask

    item = instruct_json_dataset(MessagesTokenizer(), str(records_path))[0]
    cut = len(_prompt(RECORDS[0])) + 1
    assert item["labels"][:cut] == [-100] * cut and item["labels"][cut:] == item["tokens"][cut:]


def test_bad_files_and_settings_are_refused_with_the_setting_to_change(records_path, tmp_path):
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="split must be"):
        instruct_json_dataset(tok, str(records_path), split="test")
    with pytest.raises(ValueError, match="val_fraction"):
        instruct_json_dataset(tok, str(records_path), val_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="path"):
        instruct_json_dataset(tok, str(tmp_path / "missing.json"))
    missing_output = tmp_path / "no_output.json"
    missing_output.write_text(json.dumps([{"instruction": "x", "response": "y"}]))
    with pytest.raises(ValueError, match="record 0 .* no 'output' field.*column_map"):
        instruct_json_dataset(tok, str(missing_output))
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text(json.dumps({"instruction": "x", "output": "y"}))
    with pytest.raises(ValueError, match="list of records"):
        instruct_json_dataset(tok, str(not_a_list))
    one = tmp_path / "one.json"
    one.write_text(json.dumps(RECORDS[:1]))
    with pytest.raises(ValueError, match="validation split .* is empty"):
        instruct_json_dataset(tok, str(one), split="validation")


@pytest.mark.skipif(
    not (ALPACA.is_file() and TINYSTORIES_TOKENIZER.is_file()),
    reason="needs ../shared (alpaca_4500.json and the TinyStories-656K tokenizer)",
)
def test_shared_alpaca_records_with_a_real_tokenizer():
    tokenizer = text_tokenizer(str(TINYSTORIES_TOKENIZER), prepend_space=False)
    dataset = instruct_json_dataset(tokenizer, str(ALPACA), split="validation", max_seq_len=512)
    records = json.loads(ALPACA.read_text())
    assert len(dataset) == 225  # the last 5% of 4,500
    for index in (0, 7):
        item = dataset[index]
        scored = [t for t in item["labels"] if t != -100]
        assert item["labels"][0] == -100 and item["labels"][-1] != -100
        assert tokenizer.decode(scored) == records[4275 + index]["output"]
        prompt_ids = [t for t, label in zip(item["tokens"], item["labels"]) if label == -100]
        # this tiny vocabulary has no "#": it decodes to nothing
        assert tokenizer.decode(prompt_ids).endswith("Response:\n")
