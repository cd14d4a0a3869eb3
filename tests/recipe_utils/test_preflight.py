"""Start-up checks (device, dtype, CUDA-only options, output directory, tokenizer size)
and ``run_recipe``'s one-line errors."""

import errno
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from qalora_tune.checkpointing import CheckpointWriteError
from qalora_tune.errors import UserError, UserValueError
from qalora_tune.recipe_utils import (
    TrainingError,
    check_cuda_only_options,
    check_device,
    check_output_dir,
    check_tokenizer_fits,
    resolve_dtype,
    run_recipe,
    set_interrupt_note,
    tokenizer_vocab_size,
)
from qalora_tune.tiny import TinyTokenizer

CPU = torch.device("cpu")
requires_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")


@requires_no_cuda
def test_cuda_without_cuda_names_device():
    with pytest.raises(ValueError, match="device=cuda:1 but CUDA is not available; set device=cpu"):
        check_device("cuda:1")
    check_device("cpu")


@pytest.mark.parametrize("dtype, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16), (None, torch.float32)])
def test_supported_dtypes_resolve(dtype, expected):
    assert resolve_dtype(dtype, CPU, allowed=("fp32", "bf16")) == expected


@pytest.mark.parametrize("dtype, reason", [("fp16", "overflows"), ("fp64", "int4 kernels"), ("int8", "")])
def test_unsupported_dtypes_name_dtype(dtype, reason):
    with pytest.raises(ValueError) as error:
        resolve_dtype(dtype, CPU, allowed=("fp32", "bf16"))
    message = str(error.value)
    assert message.startswith(f"dtype={dtype} is not supported here") and reason in message
    assert message.endswith("set dtype to one of fp32, bf16")


def test_offloading_off_cuda_is_an_error_and_peak_memory_is_measured_everywhere(caplog):
    with pytest.raises(ValueError, match="enable_activation_offloading=True needs a CUDA device"):
        check_cuda_only_options({"enable_activation_offloading": True}, CPU)
    logger = logging.getLogger("torchtune")
    logger.addHandler(caplog.handler)
    try:
        check_cuda_only_options({"log_peak_memory_stats": True}, CPU)
    finally:
        logger.removeHandler(caplog.handler)
    assert "log_peak_memory_stats" not in caplog.text  # no longer ignored on CPU
    check_cuda_only_options({"enable_activation_offloading": True}, torch.device("cuda"))


def test_cpu_memory_stats_are_the_process_rss_and_follow_an_allocation():
    from qalora_tune._memory import memory_stats, peak_rss_bytes

    before = memory_stats(CPU)
    assert set(before) == {"rss_gib", "peak_rss_gib"}
    assert 0 < before["rss_gib"] <= before["peak_rss_gib"]
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    assert peak_rss_bytes() >= before["rss_gib"] * 2**30 + block.numel() * 0.9
    del block


def test_output_dir_is_probed_without_being_created(tmp_path):
    path = check_output_dir(tmp_path / "a" / "b")
    assert path == tmp_path / "a" / "b" and not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []  # the probe in the nearest parent is removed
    (tmp_path / "c").mkdir()
    assert check_output_dir(tmp_path / "c") == tmp_path / "c"
    assert list((tmp_path / "c").iterdir()) == []


def test_an_output_dir_that_cannot_be_created_is_a_permission_error():
    target = Path("/sys/qalora-tune-not-writable")
    if not Path("/sys").is_dir():
        pytest.skip("needs /sys (a read-only directory even for root)")
    with pytest.raises(PermissionError) as error:
        check_output_dir(target)
    message = str(error.value)
    assert message.startswith(f"output_dir={target} is not writable (")
    assert message.endswith("set output_dir to a directory you can write")


def test_an_output_dir_under_a_file_is_a_value_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="merged_dir=.*file/out is not writable"):
        check_output_dir(tmp_path / "file" / "out", setting="merged_dir")


class _Special:
    vocab_size = 10
    special_tokens = {"<|end|>": 11}


class _EncoderOnly:
    encoder = {"a": 0, "b": 41}
    special_tokens = {"<|endoftext|>": 42}


@pytest.mark.parametrize(
    "tokenizer, expected",
    [(TinyTokenizer(), 57), (_Special(), 12), (_EncoderOnly(), 43), (object(), None)],
)
def test_tokenizer_vocab_size_takes_the_largest_measure(tokenizer, expected):
    assert tokenizer_vocab_size(tokenizer) == expected


def test_a_tokenizer_larger_than_the_embedding_table_names_tokenizer_path():
    model = nn.Module()
    model.tok_embeddings = nn.Embedding(57, 4)
    check_tokenizer_fits(TinyTokenizer(), model)
    model.tok_embeddings = nn.Embedding(40, 4)
    with pytest.raises(ValueError) as error:
        check_tokenizer_fits(TinyTokenizer(), model)
    message = str(error.value)
    assert message.startswith("the tokenizer (tokenizer.path) has 57 token ids but the model's")
    assert "has 40 rows; set tokenizer.path" in message


@pytest.mark.parametrize(
    "error",
    [
        TrainingError("the loss became nan at step 3;\nlower optimizer.lr"),
        CheckpointWriteError("could not write /x: [Errno 28] No space left on device"),
        UserValueError("model.lora_rank=0"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_run_recipe_prints_one_line_and_exits_1(capsys, error):
    def main(cfg):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_recipe("qalora_finetune", main, ["tune", "--config", "tiny_qalora"])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qalora_finetune: error: ")
    if isinstance(error, UserError):
        assert lines == [f"qalora_finetune: error: {' '.join(str(error).split())}"]
    else:
        assert "[Errno 28] No space left on device" in lines[0] and "output_dir" in lines[0]


@pytest.mark.parametrize("bug", [RuntimeError("a bug"), ValueError("a bug"), KeyError("a bug")])
def test_run_recipe_keeps_the_traceback_of_a_bug(bug):
    def main(cfg):
        raise bug

    with pytest.raises(type(bug), match="a bug"):
        run_recipe("qalora_finetune", main, ["tune", "--config", "tiny_qalora"])


def test_run_recipe_reports_ctrl_c_in_one_line_with_the_registered_note(capsys):
    def main(cfg):
        set_interrupt_note(lambda: "stopped at global step 7; resume with: tune run x")
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_recipe("qalora_finetune", main, ["tune", "--config", "tiny_qalora"])
    assert exit_info.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["qalora_finetune: interrupted: stopped at global step 7; resume with: tune run x"]


class _Llama3Like:
    """torchtune's Llama 3 tokenizer: 128000 text tokens, specials up to "<|image|>" at
    128256, one past the text models' table."""

    vocab_size = 128257
    special_tokens = {"<|begin_of_text|>": 128000, "<|eot_id|>": 128009, "<|image|>": 128256}


def test_a_multimodal_placeholder_past_the_table_does_not_count():
    model = nn.Module()
    model.tok_embeddings = nn.Embedding(128256, 1, device="meta")
    check_tokenizer_fits(_Llama3Like(), model)
    model.tok_embeddings = nn.Embedding(128009, 1, device="meta")
    with pytest.raises(ValueError, match="has 128256 token ids but the model's embedding table has 128009"):
        check_tokenizer_fits(_Llama3Like(), model)
