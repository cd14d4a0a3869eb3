"""Merged-model file formats: what each writes, what reads it back, and where it runs
without this package (a subprocess that imports only torch, torchao and transformers)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qalora_tune
from qalora_tune.checkpointing import HFKeyMap, choose_merged_format
from qalora_tune.checkpointing._merged_int4 import write_merged_int4
from qalora_tune.errors import UserValueError
from qalora_tune.modules import QALoRALinear
from qalora_tune.tiny import TINY_LLAMA_SIZES, TinyTokenizer, qalora_tiny_llama
from qalora_tune.tiny.hf_checkpoint import hf_llama_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOKENS = torch.tensor([[1, 10, 11, 12, 13, 14, 15, 16]])
requires_cuda_sm80 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
    reason="needs a CUDA GPU with compute capability 8.0+ (tinygemm int4 kernel)",
)


def _merged_tiny(seed: int = 0, **knobs):
    torch.manual_seed(seed)
    model = qalora_tiny_llama(
        ["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8,
        group_size=knobs.pop("group_size", 32), **knobs,
    )
    # a built model holds all-zero placeholders until its weights load: load random ones
    model.load_state_dict(qalora_tiny_llama.full_precision().state_dict(), strict=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QALoRALinear):
                torch.nn.init.normal_(module.lora_b.weight, std=0.05)
                module.merge()
    return model.eval()


def _write(model, directory: Path, merged_format: str) -> Path:
    directory.mkdir(parents=True)
    config = hf_llama_config(TINY_LLAMA_SIZES)
    q_proj = model.layers[0].attn.q_proj
    spec = {
        "model": {"_component_": "qalora_tune.tiny.qalora_tiny_llama", "lora_attn_modules": [],
                  "group_size": q_proj.group_size, "pad_in_dim": q_proj.padded_in_dim != q_proj.in_dim},
        "model_type": "LLAMA2",
    }
    write_merged_int4(model, directory, HFKeyMap("LLAMA2", config), config, spec, merged_format)
    TinyTokenizer().save(str(directory / "tiny_tokenizer.json"))
    return directory


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_a_merged_model_written_by_the_code_before_the_refactor_still_loads():
    """tests/fixtures/merged_int4_5454ea9: written by commit 5454ea9 (Int4Tensor file, the
    builder under its former path qalora_tune.models.qalora_tiny_llama), with the logits the
    merged model computed then."""
    saved = torch.load(FIXTURES / "merged_int4_5454ea9_logits.pt", weights_only=True)
    model = qalora_tune.load_merged(FIXTURES / "merged_int4_5454ea9")
    assert type(model.layers[0].attn.q_proj.weight).__name__ == "CpuInt4Tensor"
    logits = model(saved["tokens"])
    assert _relative(logits, saved["logits"]) < 1e-6


@pytest.mark.parametrize(
    "merged_format, bound, stored",
    [
        ("int4_plain", 0.0, "Int4Tensor"),  # the same codes, scales and fp32 zeros
        ("intx", 1e-6, "IntxUnpackedToInt8Tensor"),  # zp = -z / s rounded once in fp32
        ("int4_tile_packed", 2e-2, "Int4TilePackedTo4dTensor"),  # scales and zeros in bf16
    ],
)
@torch.no_grad()
def test_every_format_reads_back_as_the_merged_model(tmp_path, merged_format, bound, stored):
    model = _merged_tiny()
    expected = model(TOKENS)
    directory = _write(model, tmp_path / merged_format, merged_format)
    spec = json.loads((directory / "qalora_tune.json").read_text())
    assert spec["format"] == merged_format
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        info = json.loads(handle.metadata()["model.layers.0.self_attn.q_proj.weight"])
    assert info["_type"] == stored
    loaded = qalora_tune.load_merged(directory)
    assert type(loaded.layers[0].attn.q_proj.weight).__name__ == "CpuInt4Tensor"
    error = _relative(loaded(TOKENS), expected)
    assert error <= bound, error


_STOCK = r"""
import json, sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tokens = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(tokens).logits
    generated = model.generate(tokens, max_new_tokens=4, do_sample=False)
torch.save({"logits": logits, "generated": generated}, sys.argv[3])
print(json.dumps({
    "class": type(model.model.layers[0].self_attn.q_proj.weight).__name__,
    "qalora_tune_imported": any(m.split(".")[0] == "qalora_tune" for m in sys.modules),
}))
"""


@torch.no_grad()
def test_the_default_cpu_format_runs_in_stock_transformers_without_this_package(tmp_path):
    model = _merged_tiny()
    directory = _write(model, tmp_path / "merged", choose_merged_format("auto", model, torch.device("cpu")))
    result = subprocess.run(
        [sys.executable, "-c", _STOCK, str(directory), json.dumps(TOKENS.tolist()),
         str(tmp_path / "stock.pt")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"class": "IntxUnpackedToInt8Tensor", "qalora_tune_imported": False}
    stock = torch.load(tmp_path / "stock.pt", weights_only=True)
    ours = qalora_tune.load_merged(directory)(TOKENS)
    # transformers' attention differs from torchtune's by fp32 rounding only
    assert _relative(stock["logits"].float(), ours) < 1e-5
    assert stock["generated"].shape == (1, TOKENS.shape[1] + 4)


@requires_cuda_sm80
@torch.no_grad()
def test_the_tile_packed_format_runs_in_stock_transformers_on_cuda(tmp_path):
    model = _merged_tiny()
    directory = _write(model, tmp_path / "merged", "int4_tile_packed")
    code = _STOCK.replace(".eval()", ".eval().cuda()").replace(
        "tokens = torch.tensor(json.loads(sys.argv[2]))",
        "tokens = torch.tensor(json.loads(sys.argv[2])).cuda()",
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(directory), json.dumps(TOKENS.tolist()),
         str(tmp_path / "stock.pt")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"class": "Int4TilePackedTo4dTensor", "qalora_tune_imported": False}
    stock = torch.load(tmp_path / "stock.pt", weights_only=True, map_location="cpu")
    ours = qalora_tune.load_merged(directory)(TOKENS)
    assert _relative(stock["logits"].float(), ours) < 5e-2  # bf16 compute on the GPU


def test_auto_picks_a_format_that_runs_where_the_model_was_trained():
    model = _merged_tiny()
    assert choose_merged_format("auto", model, torch.device("cpu")) == "intx"
    assert choose_merged_format("auto", model, torch.device("cuda")) == "int4_tile_packed"
    assert choose_merged_format("gguf", model, torch.device("cpu")) == "intx"
    eight_bit = _merged_tiny(bits=8)
    assert choose_merged_format("auto", eight_bit, torch.device("cuda")) == "intx"
    with pytest.raises(UserValueError, match="merged_format=int4_plain holds int4 kernel bases"):
        choose_merged_format("int4_plain", eight_bit, torch.device("cpu"))
    with pytest.raises(UserValueError, match="merged_format='zip' is not a merged format"):
        choose_merged_format("zip", model, torch.device("cpu"))
    # a task package is no model format: only qalora_merge writes it (qalora_tune.tasks)
    with pytest.raises(UserValueError, match="only qalora_merge writes"):
        choose_merged_format("zero_table", model, torch.device("cpu"))


def test_padded_linears_are_written_as_plain_int4_and_refused_elsewhere():
    torch.manual_seed(0)
    from qalora_tune.models import qalora_stories260k

    model = qalora_stories260k(["q_proj"], apply_lora_to_mlp=True, group_size=32, pad_in_dim=True)
    assert choose_merged_format("auto", model, torch.device("cpu")) == "int4_plain"
    with pytest.raises(UserValueError, match="set merged_format=int4_plain"):
        choose_merged_format("intx", model, torch.device("cpu"))


@torch.no_grad()
def test_a_padded_plain_file_is_refused_by_stock_loading_in_one_line_naming_this_package(tmp_path):
    # group 256 over 128-wide inputs: every linear has a partial last group, which no
    # stock torchao kernel runs; stock from_pretrained must stop at once, saying what to use
    model = _merged_tiny(group_size=256, pad_in_dim=True)
    assert choose_merged_format("auto", model, torch.device("cpu")) == "int4_plain"
    directory = _write(model, tmp_path / "merged", "int4_plain")
    result = subprocess.run(
        [sys.executable, "-c", _STOCK, str(directory), json.dumps(TOKENS.tolist()),
         str(tmp_path / "stock.pt")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "qalora_tune_load_merged" in last and "fbgemm" not in result.stderr, last
    assert not (tmp_path / "stock.pt").exists()
    # while this package reads it back as the merged model
    ours = qalora_tune.load_merged(directory)(TOKENS)
    assert _relative(ours, model(TOKENS)) < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_intx_export_of_a_cpu_int4_base_in_row_blocks_is_the_whole_weight_conversion(bits, dtype):
    # the block-wise conversion (bounded memory) must write the very bits of the
    # whole-weight one: codes, fp32 scales and zero points, rows reordered
    from qalora_tune.checkpointing._merged_formats import (
        _intx_from_cpu_int4,
        _intx_with_float32_grid,
        _permute_rows,
    )
    from qalora_tune.quantization.base_weight import from_torchao_base

    torch.manual_seed(bits)
    with torch.device("cpu"):
        layer = QALoRALinear.from_linear(
            torch.nn.Linear(256, 200, bias=False, dtype=dtype), rank=2, alpha=4.0,
            group_size=32, bits=bits,
        )
    rows = torch.randperm(200)
    ours = _intx_from_cpu_int4(layer, rows)
    reference = _intx_with_float32_grid(_permute_rows(from_torchao_base(layer.weight), rows), dtype)
    assert type(ours) is type(reference)
    for field in ("qdata", "scale", "zero_point"):
        a, b = getattr(ours, field), getattr(reference, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    assert ours.target_dtype == reference.target_dtype and ours.dtype == reference.dtype
    assert tuple(ours.block_size) == tuple(reference.block_size)
