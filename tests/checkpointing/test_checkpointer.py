"""Atomic directories, QALoRACheckpointer save/resume, base availability and fingerprints,
and streaming Hugging Face checkpoints into torchtune / QA-LoRA models."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qalora_tune._compat import tune_to_hf
from qalora_tune.checkpointing import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PROGRESS_NAME,
    RECIPE_STATE_NAME,
    AdapterConfig,
    QALoRACheckpointer,
    atomic_directory,
    find_checkpoint_files,
    load_hf_weights,
    read_hf_config,
)
from qalora_tune.models import qalora_stories260k, qalora_tinystories656k, tied_llama
from tests.checkpointing.streaming_spy import liveness_spy

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
SHARED_MODELS = SHARED / "models"
needs_shared = pytest.mark.skipif(
    not SHARED_MODELS.is_dir(), reason=f"needs the reference checkpoints in {SHARED_MODELS}"
)


def _snapshot(directory: Path):
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------- atomic_directory


def test_atomic_directory_creates_the_final_directory_on_success(tmp_path):
    final = tmp_path / "nested" / "epoch_0"
    with atomic_directory(final) as staging:
        assert staging != final and staging.parent == final.parent and not final.exists()
        (staging / "a.txt").write_text("alpha")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.bin").write_bytes(b"\x00\x01")
    assert _snapshot(final) == {"a.txt": b"alpha", "sub/b.bin": b"\x00\x01"}
    assert sorted(p.name for p in final.parent.iterdir()) == ["epoch_0"]


def test_atomic_directory_failure_leaves_the_previous_version_intact(tmp_path):
    final = tmp_path / "epoch_0"
    final.mkdir()
    (final / "weights.bin").write_bytes(bytes(range(256)))
    (final / "config.json").write_text('{"rank": 4}')
    before = _snapshot(final)

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final) as staging:
            (staging / "weights.bin").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert _snapshot(final) == before
    # no staging or retired directory left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0"]


def test_atomic_directory_failure_without_previous_version_leaves_nothing(tmp_path):
    final = tmp_path / "epoch_3"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final) as staging:
            (staging / "x").write_text("half")
            raise KeyboardInterrupt
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_an_existing_directory(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_directory(final) as staging:
        (staging / "new.txt").write_text("new")
    assert _snapshot(final) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------- save / resume


def _checkpointer(tmp_path, **kwargs):
    kwargs.setdefault("checkpoint_dir", str(tmp_path / "base"))
    kwargs.setdefault("model_type", "LLAMA2")
    kwargs.setdefault("output_dir", str(tmp_path / "out"))
    base = Path(kwargs["checkpoint_dir"])
    base.mkdir(parents=True, exist_ok=True)
    if not (base / "config.json").exists():  # adapter names are Hugging Face's
        config = {"num_attention_heads": 4, "num_key_value_heads": 4, "hidden_size": 64}
        (base / "config.json").write_text(json.dumps(config))
    return QALoRACheckpointer(**kwargs)


def _adapters(seed):
    """Two QA-LoRA layers named as in a torchtune decoder, with random A and B."""
    from qalora_tune.modules import QALoRALinear

    torch.manual_seed(seed)
    layers = {
        f"layers.0.attn.{name}": QALoRALinear(64, 64, rank=4, alpha=8.0, group_size=32)
        for name in ("q_proj", "v_proj")
    }
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_b.weight)
    return layers


def _tune_state(layers):
    return {
        f"{name}.{part}.weight": getattr(layer, part).weight.detach().clone()
        for name, layer in layers.items()
        for part in ("lora_a", "lora_b")
    }


METADATA = {"rank": 4, "alpha": 8.0, "group_size": 32, "bits": 4, "lora_dropout": 0.0, "pooling": "sum"}


def test_save_then_resume_round_trips_the_latest_epoch(tmp_path):
    ckpt = _checkpointer(tmp_path)
    assert ckpt.latest_epoch_dir() is None
    states = []
    for epoch in (0, 1):
        layers = _adapters(seed=epoch)
        recipe = {"epoch": epoch, "steps": 10 * (epoch + 1), "opt": {"lr": torch.tensor(1e-3)}}
        metadata = dict(METADATA, target_modules=sorted(layers))
        path = ckpt.save_checkpoint(epoch, layers, metadata, recipe)
        assert path == tmp_path / "out" / f"epoch_{epoch}"
        assert (path / "adapter" / ADAPTER_WEIGHTS_NAME).is_file()
        assert (path / "adapter" / ADAPTER_CONFIG_NAME).is_file()
        assert (path / RECIPE_STATE_NAME).is_file()
        assert not (path / "merged_int4").exists()  # only with merged_model=
        states.append((_tune_state(layers), metadata, recipe))

    assert ckpt.latest_epoch_dir() == tmp_path / "out" / "epoch_1"
    resumed = ckpt.load_resume_state()
    assert resumed["path"] == tmp_path / "out" / "epoch_1"
    state, metadata, recipe = states[1]
    assert resumed["adapter"].keys() == state.keys()
    for key, value in state.items():  # bit for bit, q_proj's B rows permuted and back
        assert torch.equal(resumed["adapter"][key], value), key
    assert resumed["adapter_config"] == AdapterConfig.from_dict(metadata)
    assert resumed["recipe_state"]["epoch"] == 1 and resumed["recipe_state"]["steps"] == 20
    assert torch.equal(resumed["recipe_state"]["opt"]["lr"], recipe["opt"]["lr"])
    # epoch 0 is still on disk, unchanged
    from qalora_tune.checkpointing import read_adapter

    old, _ = read_adapter(tmp_path / "out" / "epoch_0" / "adapter", ckpt.key_map)
    for key, value in states[0][0].items():
        assert torch.equal(old[key], value)


def test_latest_epoch_is_numeric_not_lexicographic_and_ignores_other_dirs(tmp_path):
    ckpt = _checkpointer(tmp_path)
    for epoch in (2, 10, 9):
        ckpt.save_checkpoint(epoch, _adapters(epoch), METADATA, {"epoch": epoch})
    (tmp_path / "out" / "epoch_x").mkdir()
    (tmp_path / "out" / ".epoch_11.partial-abc").mkdir()
    (tmp_path / "out" / "epoch_12").write_text("a file, not an epoch")
    assert ckpt.latest_epoch_dir() == tmp_path / "out" / "epoch_10"
    assert ckpt.load_resume_state()["recipe_state"]["epoch"] == 10


def test_step_checkpoints_keep_only_the_newest_and_resume_picks_the_furthest(tmp_path):
    ckpt = _checkpointer(tmp_path)
    out = tmp_path / "out"

    def state(epoch, step):
        return {"progress": {"epoch": epoch, "global_step": step}, "step": step}

    ckpt.save_checkpoint(0, _adapters(0), METADATA, state(0, 4))
    ckpt.save_step_checkpoint(6, _adapters(1), METADATA, state(1, 6))
    assert ckpt.latest_checkpoint_dir() == out / "step_6"
    ckpt.save_step_checkpoint(8, _adapters(2), METADATA, state(1, 8))
    assert not (out / "step_6").exists()  # only the newest step checkpoint is kept
    assert json.loads((out / "step_8" / PROGRESS_NAME).read_text())["global_step"] == 8
    resumed = ckpt.load_resume_state()
    assert resumed["path"] == out / "step_8" and resumed["recipe_state"]["step"] == 8
    for key, value in _tune_state(_adapters(2)).items():
        assert torch.equal(resumed["adapter"][key], value)
    assert ckpt.latest_epoch_dir() == out / "epoch_0"  # the newest epoch, for outputs
    # the end of the epoch supersedes (and removes) its step checkpoints
    ckpt.save_checkpoint(1, _adapters(3), METADATA, state(1, 8))
    assert not (out / "step_8").exists()
    assert ckpt.latest_checkpoint_dir() == out / "epoch_1"


def test_resuming_from_an_empty_output_dir_raises(tmp_path):
    ckpt = _checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        ckpt.load_resume_state()
    (tmp_path / "out").mkdir()
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        ckpt.load_resume_state()
    # an epoch saved without recipe state cannot be resumed either
    ckpt.save_checkpoint(0, _adapters(0), METADATA)
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        ckpt.load_resume_state()


# ---------------------------------------------------------------------- base availability


@pytest.mark.parametrize(
    "repo,gated",
    [("meta-llama/Llama-2-7b-hf", True), ("Qwen/Qwen2.5-7B", False)],
)
def test_missing_base_names_the_download_command(tmp_path, repo, gated):
    base = tmp_path / "missing-model"
    ckpt = _checkpointer(tmp_path, checkpoint_dir=str(base), hf_repo_id=repo)
    with pytest.raises(FileNotFoundError) as info:
        ckpt.check_base_available()
    message = str(info.value)
    assert f"tune download {repo} --output-dir {base}" in message
    assert ckpt.download_command() in message
    assert ("--hf-token" in message) == gated


def test_missing_base_without_repo_points_at_checkpoint_dir(tmp_path):
    ckpt = _checkpointer(tmp_path)
    assert ckpt.download_command() is None
    with pytest.raises(FileNotFoundError, match="checkpoint_dir") as info:
        ckpt.check_base_available()
    assert "tune download" not in str(info.value)


def test_config_without_weights_is_also_missing(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    ckpt = _checkpointer(tmp_path, hf_repo_id="Qwen/Qwen2.5-7B")
    with pytest.raises(FileNotFoundError, match="tune download Qwen/Qwen2.5-7B"):
        ckpt.check_base_available()


# ---------------------------------------------------------------------- synthetic HF checkpoint

TINY = dict(
    vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
    intermediate_dim=64, max_seq_len=32,
)


def _write_hf_checkpoint(directory: Path, tied_key="model.embed_tokens.weight", seed=0):
    """A tied tiny llama saved in HF layout (like stories260K / tinystories656K)."""
    torch.manual_seed(seed)
    model = tied_llama(**TINY)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    sd = tune_to_hf(
        model.state_dict(), num_heads=TINY["num_heads"], num_kv_heads=TINY["num_kv_heads"],
        dim=TINY["embed_dim"],
    )
    if tied_key != "model.embed_tokens.weight":
        sd[tied_key] = sd.pop("model.embed_tokens.weight")
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / "model.safetensors"))
    config = {
        "model_type": "llama",
        "hidden_size": TINY["embed_dim"],
        "num_attention_heads": TINY["num_heads"],
        "num_key_value_heads": TINY["num_kv_heads"],
        "num_hidden_layers": TINY["num_layers"],
        "intermediate_size": TINY["intermediate_dim"],
        "vocab_size": TINY["vocab_size"],
        "tie_word_embeddings": True,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return model, sd, config


@pytest.mark.parametrize("tied_key", ["model.embed_tokens.weight", "lm_head.weight"])
def test_load_hf_weights_restores_the_exact_state(tmp_path, tied_key):
    original, _, _ = _write_hf_checkpoint(tmp_path / "base", tied_key)
    torch.manual_seed(1)
    model = tied_llama(**TINY)
    ckpt = _checkpointer(tmp_path)
    ckpt.check_base_available()
    hf_config = ckpt.load_base(model)
    assert hf_config["hidden_size"] == TINY["embed_dim"]
    loaded, expected = model.state_dict(), original.state_dict()
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), key


def _tiny_paths(tmp_path, **kwargs):
    _, sd, config = _write_hf_checkpoint(tmp_path / "base", **kwargs)
    return find_checkpoint_files(tmp_path / "base", None), sd, config


def _rewrite(tmp_path, sd):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "base" / "model.safetensors"))


def test_load_hf_weights_rejects_a_model_of_the_wrong_size(tmp_path):
    paths, _, config = _tiny_paths(tmp_path)
    wrong = tied_llama(**{**TINY, "intermediate_dim": 96})
    with pytest.raises(ValueError, match=r"checkpoint shape \(\d+, \d+\) does not match the model") as info:
        load_hf_weights(wrong, paths, "LLAMA2", config)
    assert "mlp.w" in str(info.value)


def test_load_hf_weights_rejects_extra_weights(tmp_path):
    paths, sd, config = _tiny_paths(tmp_path)
    sd["model.layers.2.mlp.down_proj.weight"] = torch.zeros(32, 64)  # a third layer
    _rewrite(tmp_path, sd)
    with pytest.raises(ValueError, match="does not have.*layers.2.mlp.down_proj.weight"):
        load_hf_weights(tied_llama(**TINY), paths, "LLAMA2", config)


def test_load_hf_weights_rejects_unknown_keys_with_value_error(tmp_path):
    paths, sd, config = _tiny_paths(tmp_path)
    sd["model.vision_tower.patch_embed.weight"] = torch.zeros(4, 4)
    _rewrite(tmp_path, sd)
    with pytest.raises(ValueError, match="does not have"):
        load_hf_weights(tied_llama(**TINY), paths, "LLAMA2", config)


def test_load_hf_weights_rejects_missing_weights(tmp_path):
    paths, sd, config = _tiny_paths(tmp_path)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    _rewrite(tmp_path, sd)
    with pytest.raises(ValueError, match="lacks.*layers.1.attn.k_proj.weight"):
        load_hf_weights(tied_llama(**TINY), paths, "LLAMA2", config)


def test_load_hf_weights_rejects_missing_tied_embedding(tmp_path):
    paths, sd, config = _tiny_paths(tmp_path)
    del sd["model.embed_tokens.weight"]
    _rewrite(tmp_path, sd)
    with pytest.raises(ValueError, match="lacks.*tok_embeddings.weight"):
        load_hf_weights(tied_llama(**TINY), paths, "LLAMA2", config)


def test_load_hf_weights_rejects_unknown_model_type(tmp_path):
    paths, _, config = _tiny_paths(tmp_path)
    with pytest.raises(ValueError, match="model_type='GPT2' is not supported"):
        load_hf_weights(tied_llama(**TINY), paths, "GPT2", config)


def test_base_fingerprint_is_stable_and_sees_a_changed_byte(tmp_path):
    _write_hf_checkpoint(tmp_path / "base")
    ckpt = _checkpointer(tmp_path)
    first = ckpt.base_fingerprint()
    assert ckpt.base_fingerprint() == first
    assert _checkpointer(tmp_path).base_fingerprint() == first

    weights = tmp_path / "base" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    assert len(data) < 1 << 20  # small file: every byte is hashed
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    changed = ckpt.base_fingerprint()
    assert changed != first

    (tmp_path / "base" / "config.json").write_text('{"changed": true}')
    assert ckpt.base_fingerprint() not in (first, changed)


@needs_shared
def test_base_fingerprint_of_a_copied_real_checkpoint(tmp_path):
    shutil.copytree(SHARED_MODELS / "stories260K", tmp_path / "base")
    ckpt = _checkpointer(tmp_path)
    first = ckpt.base_fingerprint()
    assert first == ckpt.base_fingerprint()
    weights = tmp_path / "base" / "model.safetensors"
    with open(weights, "r+b") as handle:  # flip one byte of the last tensor
        handle.seek(-3, 2)
        byte = handle.read(1)
        handle.seek(-3, 2)
        handle.write(bytes([byte[0] ^ 0x01]))
    assert ckpt.base_fingerprint() != first


# ---------------------------------------------------------------------- real checkpoints

SIZES = {
    "stories260K": dict(
        vocab_size=512, num_layers=5, num_heads=8, num_kv_heads=4, embed_dim=64,
        intermediate_dim=172, max_seq_len=512,
    ),
    "tinystories656K": dict(
        vocab_size=2048, num_layers=2, num_heads=8, num_kv_heads=4, embed_dim=128,
        intermediate_dim=384, max_seq_len=512,
    ),
}
QALORA_BUILDERS = {
    "stories260K": lambda: qalora_stories260k(
        ["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
        lora_rank=2, lora_alpha=4.0, group_size=32, pad_in_dim=True,
    ),
    "tinystories656K": lambda: qalora_tinystories656k(
        ["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
        lora_rank=4, lora_alpha=8.0, group_size=32,
    ),
}
_HF_LOGITS = {}


def _real(name):
    directory = SHARED_MODELS / name
    hf_config = read_hf_config(directory)
    return directory, hf_config, find_checkpoint_files(directory, None)


def _fixed_tokens(vocab_size):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab_size, (2, 48), generator=gen)


def _hf_logits(name):
    """transformers' logits for the fixed tokens (cached: loading costs ~1 s)."""
    if name not in _HF_LOGITS:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(SHARED_MODELS / name)).eval()
        with torch.no_grad():
            _HF_LOGITS[name] = hf(_fixed_tokens(SIZES[name]["vocab_size"])).logits.double()
    return _HF_LOGITS[name]


def _full_precision_logits(name):
    directory, hf_config, paths = _real(name)
    model = tied_llama(**SIZES[name], norm_eps=hf_config["rms_norm_eps"]).eval()
    load_hf_weights(model, paths, "LLAMA2", hf_config)
    with torch.no_grad():
        return model(_fixed_tokens(SIZES[name]["vocab_size"])).double()


@needs_shared
@pytest.mark.parametrize("name", ["stories260K", "tinystories656K"])
def test_real_checkpoint_in_tied_llama_matches_transformers(name):
    # both fp32; measured max |diff| ~1e-5 on logits up to ~18 (summation order only)
    expected = _hf_logits(name)
    out = _full_precision_logits(name)
    assert out.shape == expected.shape
    diff = (out - expected).abs().max().item()
    assert diff < 1e-4, f"max |logit diff| {diff:.3g}"


@needs_shared
@pytest.mark.parametrize(
    "name",
    [
        "stories260K",
        "tinystories656K",
    ],
)
def test_qalora_builders_use_the_checkpoints_norm_eps(name):
    _, hf_config, _ = _real(name)
    builder = qalora_stories260k if name == "stories260K" else qalora_tinystories656k
    with torch.device("meta"):
        model = builder.full_precision()
    eps = {m.eps for m in model.modules() if hasattr(m, "eps") and hasattr(m, "scale")}
    assert eps == {hf_config["rms_norm_eps"]}


@needs_shared
@pytest.mark.parametrize("name", ["stories260K", "tinystories656K"])
def test_real_checkpoint_loads_into_the_qalora_builder(name):
    directory, hf_config, paths = _real(name)
    model = QALORA_BUILDERS[name]().eval()
    load_hf_weights(model, paths, "LLAMA2", hf_config)
    with torch.no_grad():
        out = model(_fixed_tokens(SIZES[name]["vocab_size"])).double()
    reference = _full_precision_logits(name)
    # int4 RTN with groups of 32 perturbs each weight by up to half a step: measured
    # relative logit error 0.06 (stories260K) and 0.15 (tinystories656K), correlation
    # > 0.98. A wrong key mapping or an unquantized/unloaded layer gives a correlation
    # near 0 and a relative error near 1.
    rel = ((out - reference).norm() / reference.norm()).item()
    corr = torch.corrcoef(torch.stack([out.flatten(), reference.flatten()]))[0, 1].item()
    assert corr > 0.95, f"correlation {corr:.3f}"
    assert rel < 0.3, f"relative error {rel:.3f}"
    assert rel > 1e-3  # the base really is quantized
    # the prediction at most positions survives quantization
    agree = (out.argmax(-1) == reference.argmax(-1)).double().mean().item()
    assert agree > 0.6, f"argmax agreement {agree:.2f}"


def test_loading_streams_one_full_precision_tensor_at_a_time(tmp_path, monkeypatch):
    """Peak memory while loading is one full-precision tensor above the int4 model: every
    tensor read from the checkpoint is freed before the one after next is read."""

    from functools import partial

    from qalora_tune.checkpointing import _hf_weights
    from qalora_tune.models import qalora_transformer

    paths, _, config = _tiny_paths(tmp_path)
    original = _hf_weights.iter_hf_tensors
    alive_when_read = []

    spying_iter = liveness_spy(original, alive_when_read)

    monkeypatch.setattr(_hf_weights, "iter_hf_tensors", spying_iter)
    model = qalora_transformer(
        partial(tied_llama, **TINY), ["q_proj", "v_proj"], True, group_size=32
    )
    load_hf_weights(model, paths, "LLAMA2", config)
    assert len(alive_when_read) == len(load_file(str(paths[0])))
    assert all(not older for older in alive_when_read), alive_when_read


def test_atomic_directory_gives_its_files_the_umask_modes(tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "epoch_0") as staging:
            (staging / "sub").mkdir(mode=0o700)
            path = staging / "sub" / "w.safetensors"
            path.write_bytes(b"x")
            path.chmod(0o600)
    finally:
        os.umask(previous)
    final = tmp_path / "epoch_0"
    assert final.stat().st_mode & 0o777 == 0o755
    assert (final / "sub").stat().st_mode & 0o777 == 0o755
    assert (final / "sub" / "w.safetensors").stat().st_mode & 0o777 == 0o644
