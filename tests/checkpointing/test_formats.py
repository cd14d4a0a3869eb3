"""Base checkpoints in the three formats torchtune reads (Hugging Face, Meta, torchtune):
same weights give bitwise-identical QA-LoRA models, and wrong formats give clear errors."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchtune.models.llama2 import llama2

from qalora_tune._compat import tune_to_hf, tune_to_meta
from qalora_tune.checkpointing import (
    CHECKPOINT_FORMATS,
    QALoRACheckpointer,
    _formats,
    find_checkpoint_files,
    load_checkpoint_weights,
    read_checkpoint_config,
)
from qalora_tune.models import qalora_transformer, tied_llama
from tests.checkpointing.streaming_spy import liveness_spy

SIZES = dict(
    vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
    max_seq_len=32, intermediate_dim=128,
)
HF_CONFIG = {
    "model_type": "llama",
    "hidden_size": SIZES["embed_dim"],
    "num_attention_heads": SIZES["num_heads"],
    "num_key_value_heads": SIZES["num_kv_heads"],
    "num_hidden_layers": SIZES["num_layers"],
    "intermediate_size": SIZES["intermediate_dim"],
    "vocab_size": SIZES["vocab_size"],
}
PARAMS = {  # Meta's params.json for these sizes
    "dim": SIZES["embed_dim"], "n_layers": SIZES["num_layers"], "n_heads": SIZES["num_heads"],
    "n_kv_heads": SIZES["num_kv_heads"], "vocab_size": SIZES["vocab_size"], "norm_eps": 1e-5,
}
TOKENS = torch.randint(0, SIZES["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference():
    """A torchtune llama2 with fresh random weights (norms away from 1) and its logits."""
    torch.manual_seed(0)
    model = llama2(**SIZES).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
        logits = model(TOKENS)
    return {k: v.clone() for k, v in model.state_dict().items()}, logits


def _hf_sd(state_dict):
    return tune_to_hf(
        state_dict, num_heads=SIZES["num_heads"], num_kv_heads=SIZES["num_kv_heads"],
        dim=SIZES["embed_dim"],
    )


def _save_hf_weights(path: Path, state_dict) -> None:
    save_file({k: v.contiguous() for k, v in _hf_sd(state_dict).items()}, str(path))


def write_hf(directory: Path, state_dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _save_hf_weights(directory / "model.safetensors", state_dict)
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    return directory


def write_meta(directory: Path, state_dict, params=True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    sd = tune_to_meta(state_dict)
    sd["rope.freqs"] = torch.ones(SIZES["embed_dim"] // SIZES["num_heads"] // 2)  # as Llama 2's
    torch.save(sd, directory / "consolidated.00.pth")
    if params:
        (directory / "params.json").write_text(json.dumps(PARAMS))
    return directory


def write_torchtune(directory: Path, state_dict, name="model.pt", wrapped=False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(directory / name))
    else:
        torch.save({"model": state_dict} if wrapped else state_dict, directory / name)
    return directory


def qalora_model(base=llama2, **sizes):
    torch.manual_seed(1)  # adapters start with lora_b = 0; fixed seed anyway
    return qalora_transformer(
        partial(base, **{**SIZES, **sizes}), ["q_proj", "k_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True, apply_lora_to_output=base is llama2, group_size=32,
    ).eval()


def checkpointer(directory: Path, checkpoint_format: str, **kwargs) -> QALoRACheckpointer:
    return QALoRACheckpointer(
        checkpoint_dir=str(directory), model_type="LLAMA2", output_dir=str(directory / "out"),
        checkpoint_format=checkpoint_format, **kwargs,
    )


def load_logits(ckpt: QALoRACheckpointer):
    model = qalora_model()
    config = ckpt.load_base(model)
    with torch.no_grad():
        return model(TOKENS), config, model


# ---------------------------------------------------------------------- same weights, same model


TORCHTUNE_VARIANTS = [
    ("model.pt", False),
    ("model.pt", True),  # {"model": state_dict}, as torchtune's recipes write
    ("model-00001-of-00001.bin", False),  # torchtune's FullModelTorchTuneCheckpointer
    ("model.safetensors", False),
]


def test_the_three_formats_load_bitwise_identical_qalora_models(tmp_path, reference):
    state_dict, full_precision = reference
    hf_dir = write_hf(tmp_path / "hf", state_dict)
    hf_logits, hf_config, hf_model = load_logits(checkpointer(hf_dir, "hf"))
    assert hf_config == HF_CONFIG
    # the base really is the int4 version of these weights (not an unloaded model)
    corr = torch.corrcoef(torch.stack([hf_logits.flatten(), full_precision.flatten()]))[0, 1]
    assert corr > 0.95 and not torch.equal(hf_logits, full_precision)

    meta_logits, meta_config, meta_model = load_logits(
        checkpointer(write_meta(tmp_path / "meta", state_dict), "meta")
    )
    assert meta_config == PARAMS
    assert torch.equal(meta_logits, hf_logits)

    for index, (name, wrapped) in enumerate(TORCHTUNE_VARIANTS):
        directory = write_torchtune(tmp_path / f"tune{index}", state_dict, name, wrapped)
        tune_logits, tune_config, tune_model = load_logits(checkpointer(directory, "torchtune"))
        assert tune_config == {}  # no config.json needed
        assert torch.equal(tune_logits, hf_logits), (name, wrapped)

    # the full-precision parameters are exactly the checkpoint's
    for model in (hf_model, meta_model, tune_model):
        for key in ("tok_embeddings.weight", "norm.scale", "layers.1.mlp_norm.scale"):
            assert torch.equal(model.state_dict()[key], state_dict[key]), key


def test_torchtune_format_reads_several_files_and_an_optional_config(tmp_path, reference):
    state_dict, _ = reference
    keys = sorted(state_dict)
    directory = tmp_path / "tune"
    write_torchtune(directory, {k: state_dict[k] for k in keys[::2]}, "part-1.pt")
    write_torchtune(directory, {k: state_dict[k] for k in keys[1::2]}, "part-2.pt", wrapped=True)
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    assert [p.name for p in find_checkpoint_files(directory, None, "torchtune")] == [
        "part-1.pt", "part-2.pt",
    ]
    tune_logits, config, _ = load_logits(checkpointer(directory, "torchtune"))
    assert config == HF_CONFIG
    hf_logits, _, _ = load_logits(checkpointer(write_hf(tmp_path / "hf", state_dict), "hf"))
    assert torch.equal(tune_logits, hf_logits)


@pytest.mark.parametrize("checkpoint_format", ["meta", "torchtune"])
@pytest.mark.parametrize("stored", ["tok_embeddings.weight", "output.weight", "both"])
def test_tied_embeddings_load_from_either_copy(tmp_path, checkpoint_format, stored):
    torch.manual_seed(0)
    tied_sd = tied_llama(**SIZES).state_dict()
    assert "output.weight" not in tied_sd
    sd = dict(tied_sd)
    embedding = sd.pop("tok_embeddings.weight")
    if stored in ("tok_embeddings.weight", "both"):
        sd["tok_embeddings.weight"] = embedding
    if stored in ("output.weight", "both"):
        sd["output.weight"] = embedding.clone()
    if checkpoint_format == "meta":
        write_meta(tmp_path, sd)
    else:
        write_torchtune(tmp_path, sd)
    model = qalora_model(base=tied_llama)
    checkpointer(tmp_path, checkpoint_format).load_base(model)
    assert torch.equal(model.state_dict()["tok_embeddings.weight"], embedding)


# ---------------------------------------------------------------------- discovery and config


def test_default_files_per_format_skip_adapters_and_recipe_state(tmp_path, reference):
    state_dict, _ = reference
    write_hf(tmp_path, state_dict)
    write_meta(tmp_path, state_dict)
    write_torchtune(tmp_path, state_dict, "model-00001-of-00001.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.pt")
    torch.save({"epoch": 0}, tmp_path / "recipe_state.pt")
    names = {
        fmt: [p.name for p in find_checkpoint_files(tmp_path, None, fmt)]
        for fmt in CHECKPOINT_FORMATS
    }
    assert names == {
        "hf": ["model.safetensors"],
        "meta": ["consolidated.00.pth"],
        "torchtune": ["model-00001-of-00001.pt"],
    }
    # explicit files win over discovery
    assert find_checkpoint_files(tmp_path, ["model.safetensors"], "torchtune") == [
        tmp_path / "model.safetensors"
    ]


def test_config_is_required_for_hf_only(tmp_path, reference):
    state_dict, _ = reference
    write_meta(tmp_path / "meta", state_dict, params=False)
    assert read_checkpoint_config(tmp_path / "meta", "meta") == {}
    _, config, _ = load_logits(checkpointer(tmp_path / "meta", "meta"))
    assert config == {}
    (tmp_path / "hf").mkdir()
    _save_hf_weights(tmp_path / "hf" / "model.safetensors", state_dict)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        checkpointer(tmp_path / "hf", "hf").check_base_available()


def test_base_fingerprint_works_for_every_format(tmp_path, reference):
    state_dict, _ = reference
    meta = checkpointer(write_meta(tmp_path / "meta", state_dict), "meta")
    tune = checkpointer(write_torchtune(tmp_path / "tune", state_dict), "torchtune")
    hf = checkpointer(write_hf(tmp_path / "hf", state_dict), "hf")
    prints = {c.checkpoint_format: c.base_fingerprint() for c in (hf, meta, tune)}
    assert len(set(prints.values())) == 3
    assert tune.base_fingerprint() == prints["torchtune"]  # stable, with no config file at all
    (tmp_path / "meta" / "params.json").write_text(json.dumps({**PARAMS, "norm_eps": 1e-6}))
    assert meta.base_fingerprint() != prints["meta"]
    weights = tmp_path / "tune" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert tune.base_fingerprint() != prints["torchtune"]


def test_download_command_per_format(tmp_path):
    repo = "meta-llama/Llama-2-7b"
    hf = checkpointer(tmp_path, "hf", hf_repo_id=repo).download_command()
    assert '--ignore-patterns "original/consolidated*"' in hf
    meta = checkpointer(tmp_path, "meta", hf_repo_id=repo).download_command()
    assert '--ignore-patterns "*.safetensors"' in meta and "--hf-token" in meta
    assert checkpointer(tmp_path, "torchtune", hf_repo_id=repo).download_command() is None


# ---------------------------------------------------------------------- errors


def test_unknown_format_is_a_value_error_naming_the_allowed_values(tmp_path):
    allowed = r"use one of \('hf', 'meta', 'torchtune'\)"
    with pytest.raises(ValueError, match=r"checkpoint_format='gguf' is not supported; " + allowed):
        checkpointer(tmp_path, "gguf")
    with pytest.raises(ValueError, match="use one of"):
        find_checkpoint_files(tmp_path, None, "HF")
    with pytest.raises(ValueError, match="use one of"):
        load_checkpoint_weights(qalora_model(), [], "safetensors", "LLAMA2", {})


@pytest.mark.parametrize(
    "write,checkpoint_format,found",
    [
        (write_hf, "meta", "hf"),
        (write_meta, "hf", "meta"),
        (write_meta, "torchtune", "meta"),
        (write_torchtune, "hf", "torchtune"),
        (write_torchtune, "meta", "torchtune"),
    ],
)
def test_a_directory_of_another_format_names_the_right_one(
    tmp_path, reference, write, checkpoint_format, found
):
    write(tmp_path, reference[0])
    ckpt = checkpointer(tmp_path, checkpoint_format)
    with pytest.raises(ValueError, match=f"set checkpointer.checkpoint_format='{found}'"):
        ckpt.check_base_available()
    with pytest.raises(ValueError, match=f"checkpoint_format='{found}'"):
        ckpt.load_base(qalora_model())


@pytest.mark.parametrize(
    "write,files,checkpoint_format,found",
    [
        (write_hf, ["model.safetensors"], "meta", "hf"),
        (write_hf, None, "torchtune", "hf"),  # torchtune's default files include *.safetensors
        (write_meta, ["consolidated.00.pth"], "torchtune", "meta"),
        (write_torchtune, ["model.pt"], "meta", "torchtune"),
    ],
)
def test_keys_of_another_format_name_the_right_one(
    tmp_path, reference, write, files, checkpoint_format, found
):
    write(tmp_path, reference[0])
    ckpt = checkpointer(tmp_path, checkpoint_format, checkpoint_files=files)
    message = f"does not have.*'{found}' layout.*checkpoint_format='{found}'"
    with pytest.raises(ValueError, match=message):
        ckpt.load_base(qalora_model())


def test_meta_weights_under_original_name_that_directory(tmp_path, reference):
    write_hf(tmp_path, reference[0])
    write_meta(tmp_path / "original", reference[0])
    with pytest.raises(ValueError, match=r"checkpoint_dir='.*/original'"):
        checkpointer(tmp_path, "meta").check_base_available()


@pytest.mark.parametrize(
    "checkpoint_format,message",
    [
        ("hf", r"no \*.safetensors or \*.bin weights"),
        ("meta", r"no \*.pth weights"),
        ("torchtune", r"no \*.pt or \*.bin or \*.safetensors weights"),
    ],
)
def test_missing_weights_are_file_not_found(tmp_path, checkpoint_format, message):
    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    ckpt = checkpointer(tmp_path, checkpoint_format)
    with pytest.raises(FileNotFoundError, match=message) as info:
        ckpt.check_base_available()
    assert "checkpoint_dir" in str(info.value)
    named = checkpointer(tmp_path, checkpoint_format, checkpoint_files=["consolidated.01.pth"])
    with pytest.raises(FileNotFoundError, match="checkpoint files not found: .*consolidated.01.pth"):
        named.load_base(qalora_model())


def test_meta_shards_are_refused(tmp_path, reference):
    write_meta(tmp_path, reference[0])
    (tmp_path / "consolidated.01.pth").write_bytes((tmp_path / "consolidated.00.pth").read_bytes())
    with pytest.raises(ValueError, match="one consolidated file.*consolidated.01.pth"):
        checkpointer(tmp_path, "meta").check_base_available()
    # one named file is fine
    named = checkpointer(tmp_path, "meta", checkpoint_files=["consolidated.00.pth"])
    named.load_base(qalora_model())


def test_missing_extra_and_misshapen_weights_are_value_errors(tmp_path, reference):
    state_dict, _ = reference
    sd = tune_to_meta(state_dict)
    del sd["layers.1.attention.wk.weight"]
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="lacks.*layers.1.attn.k_proj.weight"):
        checkpointer(tmp_path, "meta").load_base(qalora_model())

    write_torchtune(tmp_path, {**state_dict, "layers.2.mlp.w2.weight": torch.zeros(64, 128)})
    with pytest.raises(ValueError, match=r"does not have.*layers.2.mlp.w2.weight") as info:
        checkpointer(tmp_path, "torchtune").load_base(qalora_model())
    assert "layout" not in str(info.value)  # torchtune keys: no format hint

    # an int4 layer's weight of the wrong shape: the error names the key and both shapes
    message = (
        r"layers.0.mlp.w1.weight: checkpoint shape \(128, 64\) does not match the model's "
        r"\(96, 64\).*model._component_.*checkpointer.checkpoint_dir"
    )
    with pytest.raises(ValueError, match=message):
        checkpointer(tmp_path, "torchtune").load_base(qalora_model(intermediate_dim=96))
    # a full-precision layer too
    message = r"tok_embeddings.weight: checkpoint shape \(64, 64\) does not match"
    with pytest.raises(ValueError, match=message):
        load_checkpoint_weights(
            llama2(**{**SIZES, "embed_dim": 32}), [tmp_path / "model.pt"], "torchtune", "LLAMA2", {}
        )


def test_a_pickle_that_is_not_a_state_dict_is_a_value_error(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        checkpointer(tmp_path, "torchtune").load_base(qalora_model())


# ---------------------------------------------------------------------- streaming


@pytest.mark.parametrize("checkpoint_format", ["meta", "torchtune"])
def test_meta_and_torchtune_stream_one_tensor_at_a_time(
    tmp_path, reference, monkeypatch, checkpoint_format
):
    """Every tensor read from a .pth/.pt file is freed before the one after next is read."""
    state_dict, _ = reference
    if checkpoint_format == "meta":
        write_meta(tmp_path, state_dict)
    else:
        write_torchtune(tmp_path, state_dict, wrapped=True)
    original = _formats.iter_checkpoint_tensors
    alive_when_read = []

    spying_iter = liveness_spy(original, alive_when_read)

    monkeypatch.setattr(_formats, "iter_checkpoint_tensors", spying_iter)
    checkpointer(tmp_path, checkpoint_format).load_base(qalora_model())
    assert len(alive_when_read) >= len(state_dict)
    assert all(not older for older in alive_when_read), alive_when_read
