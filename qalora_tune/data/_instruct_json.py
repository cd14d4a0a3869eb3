"""Instruction records (Alpaca format) from a local JSON file, loss on the response only.

torchtune's ``alpaca_dataset`` loads through the Hugging Face Hub; this builder reads the
same ``{"instruction", "input", "output"}`` records from a local ``.json`` (a list) or
``.jsonl`` file, formats them with torchtune's :class:`~torchtune.data.AlpacaToMessages`
(the Alpaca prompt template), and masks the prompt out of the labels, so a loss or a
perplexity measured on it covers the response tokens (and the closing EOS) only.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, AlpacaToMessages, Message

from qalora_tune._files import read_text
from qalora_tune.errors import UserFileNotFoundError, UserValueError

__all__ = ["InstructJSONDataset", "instruct_json_dataset", "tokenize_messages"]


class InstructJSONDataset(Dataset):
    """Alpaca-style records, tokenized on access.

    Items are ``{"tokens": List[int], "labels": List[int]}`` of equal length, labels aligned
    with the tokens (torchtune's SFT convention: the recipes shift them by one) and
    ``-100`` on every prompt position unless ``train_on_input``.

    Args:
        records (Sequence[Mapping[str, Any]]): the records.
        tokenizer: a torchtune ``ModelTokenizer`` (``tokenize_messages``) or anything with
            ``encode(text, add_bos, add_eos)``.
        train_on_input (bool): keep the prompt tokens in the labels.
        column_map (Dict[str, str], optional): names of the ``instruction``, ``input`` and
            ``output`` fields in the records, when they differ.
        max_seq_len (int, optional): truncate each example to this many tokens (default:
            the tokenizer's ``max_seq_len``, if any).
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        train_on_input: bool = False,
        column_map: Optional[Dict[str, str]] = None,
        max_seq_len: Optional[int] = None,
    ):
        self._records = records
        self._tokenizer = tokenizer
        self._to_messages = AlpacaToMessages(train_on_input=train_on_input, column_map=column_map)
        self._max_seq_len = max_seq_len or getattr(tokenizer, "max_seq_len", None)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        messages = self._to_messages(self._records[index])["messages"]
        tokens, mask = tokenize_messages(self._tokenizer, messages)
        labels = [CROSS_ENTROPY_IGNORE_IDX if masked else t for t, masked in zip(tokens, mask)]
        if self._max_seq_len:
            tokens, labels = tokens[: self._max_seq_len], labels[: self._max_seq_len]
        return {"tokens": list(tokens), "labels": labels}


def tokenize_messages(tokenizer: Any, messages: List[Message]) -> Tuple[List[int], List[bool]]:
    """Token ids of ``messages`` and, per token, whether it is masked out of the loss.

    A torchtune ``ModelTokenizer`` formats the messages its own way (``tokenize_messages``).
    A plain text tokenizer (``encode`` only, e.g. :class:`~qalora_tune.data.TextTokenizer`)
    encodes each message separately and concatenates them: BOS before the first, EOS
    after the last, each token masked as its message is.

    Args:
        tokenizer: see :class:`InstructJSONDataset`.
        messages (List[Message]): the conversation.

    Returns:
        Tuple[List[int], List[bool]]: ``tokens`` and ``mask``, both of length ``seq``.
    """
    if hasattr(tokenizer, "tokenize_messages"):
        tokens, mask = tokenizer.tokenize_messages(messages)
        return list(tokens), list(mask)
    tokens: List[int] = []
    mask: List[bool] = []
    last = len(messages) - 1
    for position, message in enumerate(messages):
        ids = tokenizer.encode(
            message.text_content, add_bos=position == 0, add_eos=position == last
        )
        tokens += ids
        mask += [message.masked] * len(ids)
    return tokens, mask


def instruct_json_dataset(
    tokenizer: Any,
    path: str,
    split: str = "train",
    val_fraction: float = 0.05,
    train_on_input: bool = False,
    column_map: Optional[Dict[str, str]] = None,
    max_seq_len: Optional[int] = None,
) -> InstructJSONDataset:
    """Alpaca-format records of a local file: the first ``1 - val_fraction`` of them for
    ``train``, the rest (the file's tail, in file order) for ``validation``.

    Args:
        tokenizer: a torchtune ``ModelTokenizer`` or anything with
            ``encode(text, add_bos, add_eos)``.
        path (str): a ``.json`` file holding a list of records, or a ``.jsonl`` file with
            one record per line.
        split (str): ``"train"`` or ``"validation"``.
        val_fraction (float): share of the records (the tail) held out for validation.
        train_on_input (bool): keep the prompt tokens in the labels (default: the loss
            covers the response only).
        column_map (Dict[str, str], optional): e.g. ``{"output": "response"}`` when the
            records name their fields differently.
        max_seq_len (int, optional): truncate each example to this many tokens; set it to
            the model's context length.

    Returns:
        InstructJSONDataset: items ``{"tokens": List[int], "labels": List[int]}``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for an unknown split, a fraction outside (0, 1), a file that is not
            JSON records, a record without the instruction or output field, or a split
            with no record.
    """
    if split not in ("train", "validation"):
        raise UserValueError(f"split must be 'train' or 'validation', got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise UserValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_seq_len is not None and max_seq_len < 2:
        raise UserValueError(f"max_seq_len must be at least 2 or null, got {max_seq_len}")
    records = _read_records(Path(path).expanduser())
    _check_fields(records, column_map or {}, path)
    cut = int(round(len(records) * (1.0 - val_fraction)))
    part = records[:cut] if split == "train" else records[cut:]
    if not part:
        raise UserValueError(
            f"the {split} split of {path} is empty ({len(records)} records, "
            f"val_fraction={val_fraction}); change val_fraction"
        )
    return InstructJSONDataset(part, tokenizer, train_on_input, column_map, max_seq_len)


def _read_records(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        raise UserFileNotFoundError(f"dataset file {path} not found; set the dataset's path")
    text = read_text(path, "dataset.path", "point path to Alpaca-format records in UTF-8 JSON")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserValueError(
            f"dataset.path {path} is not valid JSON ({error.msg} at line {error.lineno}); point "
            "path to Alpaca-format records"
        ) from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserValueError(
            f"{path} must hold a list of records (objects with instruction, input and "
            "output fields), or one record per line in a .jsonl file"
        )
    return records


def _check_fields(records: List[Dict[str, Any]], column_map: Dict[str, str], path: str) -> None:
    for field in ("instruction", "output"):
        name = column_map.get(field, field)
        for index, record in enumerate(records):
            if name not in record:
                raise UserValueError(
                    f"record {index} of {path} has no {name!r} field (it has "
                    f"{sorted(record)}); set column_map to name the {field} field"
                )
