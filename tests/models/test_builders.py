"""QA-LoRA model builders: structure of every packaged config's model, numerics of
``qalora_transformer`` against a float64 reference, errors, and meta-device building."""

import copy
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torchtune import config as tune_config
from torchtune.models.llama2 import llama2
from torchtune.modules import RMSNorm

from qalora_tune.models import (
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    qalora_llama3_2_1b,
    qalora_transformer,
    tied_llama,
)
from qalora_tune.modules import QALoRALinear, QuantizedLinear
from qalora_tune.quantization.int4_weight import dequantize_int4, is_int4_weight
from qalora_tune.recipe_utils import packaged_config_names, resolve_config
from tests.reference import pooled_lora_reference

SMALL_SIZES = dict(
    vocab_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=64,
    max_seq_len=64,
    intermediate_dim=96,
)
small_llama2 = partial(llama2, **SMALL_SIZES)
small_tied = partial(tied_llama, **SMALL_SIZES)


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    path = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    return model.get_submodule(path)


def _is_adapter_param(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    if len(parts) < 3 or parts[-2] not in ("lora_a", "lora_b") or parts[-1] != "weight":
        return False
    return isinstance(model.get_submodule(".".join(parts[:-2])), QALoRALinear)


def _check_structure(model, *, targets, group_size, rank, alpha, dropout, quantizer, pad_in_dim,
                     lora_output):
    """Every linear replaced, adapters exactly on ``targets``, knobs as configured."""
    # no nn.Linear outside the adapters' own lora_a / lora_b
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parent_path, _, leaf = path.rpartition(".")
            assert leaf in ("lora_a", "lora_b") and isinstance(
                model.get_submodule(parent_path), QALoRALinear
            ), f"{path} is still an nn.Linear"

    # every decoder layer has the seven projections, adapted exactly when targeted
    assert len(model.layers) > 0
    for index, layer in enumerate(model.layers):
        leaves = {}
        for path, module in layer.named_modules():
            if isinstance(module, QuantizedLinear):
                leaves[path.rpartition(".")[2]] = module
        assert set(leaves) == set(ATTENTION_PROJECTIONS) | set(MLP_PROJECTIONS), (index, set(leaves))
        for leaf, module in leaves.items():
            expected = QALoRALinear if leaf in targets else QuantizedLinear
            assert type(module) is expected, f"layers.{index}.{leaf}: {type(module).__name__}"

    # the output projection: a QALoRALinear iff requested, tied outputs are no module
    if isinstance(model.output, nn.Module):
        assert type(model.output) is (QALoRALinear if lora_output else QuantizedLinear)
    else:
        assert not lora_output

    adapters = 0
    for path, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        assert module.group_size == group_size, path
        assert module.quantizer == quantizer, path
        assert module.padded_in_dim % group_size == 0, path
        if not pad_in_dim:
            assert module.padded_in_dim == module.in_dim, path
        assert is_int4_weight(module.weight), f"{path}.weight is {type(module.weight).__name__}"
        assert tuple(module.weight.shape) == (module.out_dim, module.padded_in_dim), path
        if isinstance(module, QALoRALinear):
            adapters += 1
            assert module.rank == rank and module.alpha == alpha, path
            assert module.lora_a.weight.shape == (rank, module.n_groups), path
            assert module.lora_b.weight.shape == (module.out_dim, rank), path
            if dropout > 0:
                assert isinstance(module.dropout, nn.Dropout) and module.dropout.p == dropout
            else:
                assert isinstance(module.dropout, nn.Identity)
    per_layer = sum(1 for leaf in targets if leaf != "output")
    assert adapters == per_layer * len(model.layers) + int(lora_output)

    # only adapters train; every other parameter is an int4 linear weight, a frozen
    # linear bias, an embedding or a (1-D) norm scale: no full-precision linear weight
    for name, param in model.named_parameters():
        if _is_adapter_param(model, name):
            assert param.requires_grad, name
            continue
        assert not param.requires_grad, name
        owner = _owner(model, name)
        leaf = name.rpartition(".")[2]
        if isinstance(owner, QuantizedLinear):
            assert leaf in ("weight", "bias"), name
            if leaf == "weight":
                assert is_int4_weight(param), name
            else:
                assert param.dim() == 1, name
        else:
            assert isinstance(owner, nn.Embedding) or param.dim() == 1, (
                f"{name}: a {tuple(param.shape)} full-precision parameter of "
                f"{type(owner).__name__}"
            )


def _config_cases():
    # the *_generate configs load a merged model written by a training config: no builder
    names = [n for n in packaged_config_names() if not n.endswith("_generate")]
    return [pytest.param(name, id=name) for name in names]


@pytest.mark.parametrize("config_name", _config_cases())
def test_every_packaged_config_builds_a_qalora_model_on_meta(config_name):
    cfg = OmegaConf.load(resolve_config(config_name))
    model_cfg = cfg.model
    try:
        with torch.device("meta"):
            model = tune_config.instantiate(model_cfg)
    except ImportError as error:
        if "tiny" in str(error).lower() or "TINY_LLAMA_SIZES" in str(error):
            pytest.skip(f"{config_name}: qalora_tune.tiny is not available yet ({error})")
        raise
    targets = set(model_cfg.lora_attn_modules)
    if model_cfg.get("apply_lora_to_mlp", False):
        targets |= set(MLP_PROJECTIONS)
    lora_output = bool(model_cfg.get("apply_lora_to_output", False))
    if lora_output:
        targets.add("output")
    _check_structure(
        model,
        targets=targets,
        group_size=model_cfg.get("group_size", 64),
        rank=model_cfg.get("lora_rank", 8),
        alpha=model_cfg.get("lora_alpha", 16.0),
        dropout=model_cfg.get("lora_dropout", 0.0),
        quantizer=model_cfg.get("quantizer", "rtn"),
        pad_in_dim=model_cfg.get("pad_in_dim", False),
        lora_output=lora_output,
    )
    # built on meta: nothing allocated
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


def test_building_llama3_2_1b_on_meta_allocates_nothing():
    with torch.device("meta"):
        model = qalora_llama3_2_1b(["q_proj", "v_proj"], apply_lora_to_mlp=True, group_size=64)
    params = list(model.parameters())
    assert len(params) > 0
    assert all(p.is_meta for p in params)
    assert all(b.is_meta for b in model.buffers())
    # the int4 payloads themselves (codes, scales and zeros) are meta too
    int4 = [m.weight for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(int4) == 16 * 7
    assert all(w.qdata.is_meta and w.scale_and_zero.is_meta for w in int4)


def test_base_decoder_is_built_on_meta_even_when_building_on_cpu():
    seen = []

    def recording_base():
        seen.append(torch.get_default_device())
        return small_llama2()

    model = qalora_transformer(recording_base, ["q_proj"], group_size=32)
    assert [d.type for d in seen] == ["meta"]
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())


def _small_qalora(**kwargs):
    kwargs.setdefault("lora_attn_modules", ["q_proj", "v_proj", "output_proj"])
    kwargs.setdefault("apply_lora_to_mlp", True)
    kwargs.setdefault("apply_lora_to_output", True)
    lora_attn_modules = kwargs.pop("lora_attn_modules")
    return qalora_transformer(
        small_llama2, lora_attn_modules, lora_rank=2, lora_alpha=4.0, group_size=32, **kwargs
    )


class _Float64Linear(nn.Module):
    """x W^T (+ b) (+ (alpha/r) B A pool(x)) in float64, for the reference model."""

    def __init__(self, layer: QuantizedLinear):
        super().__init__()
        self.in_dim, self.padded = layer.in_dim, layer.padded_in_dim
        self.weight = dequantize_int4(layer.weight, torch.float64)
        self.bias = None if layer.bias is None else layer.bias.detach().double()
        self.adapter = None
        if isinstance(layer, QALoRALinear):
            self.adapter = (
                layer.lora_a.weight.detach().double(),
                layer.lora_b.weight.detach().double(),
                layer.group_size,
                layer.scaling,
            )

    def forward(self, x):
        x = F.pad(x.double(), (0, self.padded - self.in_dim))
        out = x @ self.weight.t()
        if self.bias is not None:
            out = out + self.bias
        if self.adapter is not None:
            out = out + pooled_lora_reference(x, *self.adapter)
        return out


class _Float64RMSNorm(nn.Module):
    """torchtune's RMSNorm computes in fp32 whatever its input; this one in float64."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.eps = norm.eps
        self.scale = norm.scale.detach().double()

    def forward(self, x):
        x = x.double()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def _float64_reference(plain: nn.Module, qalora: nn.Module) -> nn.Module:
    ref = copy.deepcopy(plain).double().eval()
    for path, module in list(ref.named_modules()):
        if isinstance(module, RMSNorm):
            parent_path, _, leaf = path.rpartition(".")
            setattr(ref.get_submodule(parent_path), leaf, _Float64RMSNorm(module))
    for path, module in qalora.named_modules():
        if isinstance(module, QuantizedLinear):
            parent_path, _, leaf = path.rpartition(".")
            setattr(ref.get_submodule(parent_path), leaf, _Float64Linear(module))
    return ref


def _loaded_pair(seed=0, **kwargs):
    torch.manual_seed(seed)
    plain = small_llama2().eval()
    model = _small_qalora(**kwargs).eval()
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all("lora_" in k for k in result.missing_keys)
    return plain, model


# Tolerance: the QA-LoRA model runs in fp32 (u = 6e-8) over two layers with reductions of
# at most 96 terms; its measured deviation from the float64 reference (same dequantized
# weights, float64 norms) is ~3e-7 of the largest logit. 1e-5 of it leaves ~30x margin,
# while quantization itself moves the logits by ~6e-2 of it: the checks below require
# the adapter / quantization effect to exceed 1e-2, so the comparison is not vacuous.
REL_TOL = 1e-5


def test_qalora_transformer_with_zero_b_equals_dequantized_float64_model():
    plain, model = _loaded_pair()
    for module in model.modules():
        if isinstance(module, QALoRALinear):
            assert torch.count_nonzero(module.lora_b.weight) == 0
    tokens = torch.randint(0, SMALL_SIZES["vocab_size"], (2, 16))
    ref = _float64_reference(plain, model)
    with torch.no_grad():
        expected = ref(tokens)
        out = model(tokens)
        unquantized = _float64_reference(plain, plain)(tokens)
    scale = expected.abs().max()
    err = (out.double() - expected).abs().max()
    assert err <= REL_TOL * scale, f"max error {err:.3g} vs largest logit {scale:.3g}"
    # quantization visibly changed the function, so the comparison above is not vacuous
    assert (unquantized - expected).abs().max() > 1000 * REL_TOL * scale


def test_qalora_transformer_with_random_b_equals_float64_reference_with_adapters():
    plain, model = _loaded_pair(seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QALoRALinear):
                module.lora_b.weight.copy_(
                    torch.randn(module.lora_b.weight.shape, generator=gen) * 0.1
                )
    tokens = torch.randint(0, SMALL_SIZES["vocab_size"], (2, 16), generator=gen)
    ref = _float64_reference(plain, model)
    with torch.no_grad():
        expected = ref(tokens)
        out = model(tokens)
        without_adapter = _float64_reference(plain, _zero_b_copy(model))(tokens)
    scale = expected.abs().max()
    err = (out.double() - expected).abs().max()
    assert err <= REL_TOL * scale, f"max error {err:.3g} vs largest logit {scale:.3g}"
    assert (without_adapter - expected).abs().max() > 1000 * REL_TOL * scale


def _zero_b_copy(model):
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for module in clone.modules():
            if isinstance(module, QALoRALinear):
                module.lora_b.weight.zero_()
    return clone


def test_gradients_reach_only_the_adapters():
    _, model = _loaded_pair(seed=3)
    model.train()
    tokens = torch.randint(0, SMALL_SIZES["vocab_size"], (2, 16))
    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    adapter_b = 0
    for name, param in model.named_parameters():
        if _is_adapter_param(model, name):
            assert param.requires_grad and param.grad is not None, name
            if name.endswith("lora_b.weight"):
                adapter_b += 1
                # with B = 0 the loss still depends on B: its gradient is nonzero
                assert torch.count_nonzero(param.grad) > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name
    # q, v, output_proj, w1, w2, w3 per layer, plus the output projection
    assert adapter_b == 6 * SMALL_SIZES["num_layers"] + 1


def test_unknown_attention_module_name_raises():
    with pytest.raises(ValueError, match=r"unknown lora_attn_modules \['query'\]"):
        qalora_transformer(small_llama2, ["q_proj", "query"], group_size=32)


def test_adapter_on_a_tied_output_raises():
    with pytest.raises(ValueError, match="apply_lora_to_output=True.*tied"):
        qalora_transformer(small_tied, ["q_proj"], apply_lora_to_output=True, group_size=32)


@pytest.mark.parametrize("apply_lora_to_mlp", [False, True], ids=["int4", "qalora"])
def test_group_size_that_does_not_divide_a_linear_names_it_and_suggests_pad_in_dim(
    apply_lora_to_mlp,
):
    # intermediate_dim 96: group 64 divides 64 (attention, w1, w3) but not w2's input
    with torch.device("meta"):
        with pytest.raises(ValueError) as info:
            qalora_transformer(
                small_llama2, ["q_proj"], apply_lora_to_mlp=apply_lora_to_mlp, group_size=64
            )
        message = str(info.value)
        assert message.startswith("layers.0.mlp.w2: ")
        assert "in_dim=96" in message and "pad_in_dim" in message

        model = qalora_transformer(
            small_llama2,
            ["q_proj"],
            apply_lora_to_mlp=apply_lora_to_mlp,
            group_size=64,
            pad_in_dim=True,
        )
    w2 = model.layers[0].mlp.w2
    assert type(w2) is (QALoRALinear if apply_lora_to_mlp else QuantizedLinear)
    assert (w2.in_dim, w2.padded_in_dim) == (96, 128)
    assert model.layers[0].attn.q_proj.padded_in_dim == 64  # divisible: not padded


def test_padded_model_loads_and_matches_float64_reference():
    """pad_in_dim=True on CPU: w2 (in 96) padded to 128 with group 64; still exact."""
    torch.manual_seed(4)
    plain = small_llama2().eval()
    model = qalora_transformer(
        small_llama2, ["q_proj"], apply_lora_to_mlp=True, group_size=64, pad_in_dim=True
    ).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    assert model.layers[1].mlp.w2.weight.shape == (64, 128)
    tokens = torch.randint(0, SMALL_SIZES["vocab_size"], (2, 12))
    with torch.no_grad():
        expected = _float64_reference(plain, model)(tokens)
        out = model(tokens)
    assert (out.double() - expected).abs().max() <= REL_TOL * expected.abs().max()


def test_qalora_tune_imports_and_builds_under_a_meta_default_device():
    """The recipe flow `with torch.device("meta"): instantiate(cfg.model)` imports the
    builder lazily; a fresh interpreter must be able to import qalora_tune there."""
    code = (
        "import torch\n"
        "torch.set_default_device('meta')\n"
        "from qalora_tune.models import qalora_transformer\n"
        "from functools import partial\n"
        "from torchtune.models.llama2 import llama2\n"
        f"base = partial(llama2, **{SMALL_SIZES!r})\n"
        "model = qalora_transformer(base, ['q_proj'], group_size=32)\n"
        "assert all(p.is_meta for p in model.parameters())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------- knobs named as settings


@pytest.mark.parametrize(
    "knobs, message",
    [
        (dict(bits=5), "model.bits=5 is not a supported bit width; choose from 2, 3, 4, 8"),
        (dict(lora_rank=0), "model.lora_rank=0: the adapter rank must be a positive integer"),
        (dict(lora_rank=2.5), "set model.lora_rank"),
        (dict(lora_alpha=0), "model.lora_alpha=0: .*must be positive"),
        (dict(lora_alpha=-1.0), "set model.lora_alpha"),
        (dict(lora_dropout=1.0), r"model.lora_dropout=1.0 is not a probability in \[0, 1\)"),
        (dict(lora_dropout=-0.1), "set model.lora_dropout"),
        (dict(group_size=0), "model.group_size=0 is not a positive integer; set model.group_size"),
        (dict(group_size=48), "model.group_size=48 does not divide in_dim=64; set model.group_size to 32"),
    ],
)
def test_bad_knobs_name_the_model_setting(knobs, message):
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        qalora_transformer(small_llama2, ["q_proj"], **{"group_size": 32, **knobs})


def test_eight_bit_scales_reach_every_linear_and_cut_the_bits_per_weight():
    from qalora_tune.models import base_bits_per_weight
    from qalora_tune.quantization.double_quant import is_double_quant

    bits = {}
    for double_quant in (False, True):
        torch.manual_seed(0)
        model = _small_qalora(double_quant_scales=double_quant)
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert layers and all(is_double_quant(m.weight) == double_quant for m in layers)
        bits[double_quant] = base_bits_per_weight(model)
    # fp32 scales at G=32: 4 + 64/32 bits; 8-bit ones: 4 + 40/32 plus a float32 pair per
    # row (in_dim 64 or 96)
    assert bits[False] == pytest.approx(6.0)
    assert 4 + 40 / 32 + 64 / 96 <= bits[True] <= 4 + 40 / 32 + 64 / 64


def _expected_base_bits(model, double_quant):
    """Bits per weight from the storage formula: 4-bit codes, then per (padded row, group)
    a float32 scale and zero (dense) or a uint8 code and a float32 zero plus a float32 min
    and step per padded row (8-bit scales); rows padded to 16."""
    stored = weights = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            rows = -(-m.out_dim // 16) * 16
            groups = m.padded_in_dim // m.group_size
            per_group = 1 + 4 if double_quant else 4 + 4
            stored += rows * m.padded_in_dim // 2 + rows * groups * per_group
            stored += rows * 8 if double_quant else 0
            weights += m.out_dim * m.in_dim
    return 8 * stored / weights


@pytest.mark.parametrize("sizes", [SMALL_SIZES, dict(SMALL_SIZES, embed_dim=256, intermediate_dim=512)])
def test_base_bits_per_weight_follows_the_storage_formula(sizes):
    from qalora_tune.models import base_bits_per_weight

    bits = {}
    for double_quant in (False, True):
        with torch.device("meta"):
            model = qalora_transformer(partial(llama2, **sizes), ["q_proj", "v_proj"],
                                       apply_lora_to_mlp=True, group_size=32,
                                       double_quant_scales=double_quant)
        bits[double_quant] = base_bits_per_weight(model)
        assert bits[double_quant] == pytest.approx(_expected_base_bits(model, double_quant))
    if sizes["embed_dim"] >= 256:
        # 24 bits saved per group of 32 outweigh 64 bits per row once rows are this wide
        assert bits[True] < bits[False]
    else:
        # in_dim 64 and 96: the per-row grid costs more than the 2 or 3 groups save
        assert bits[True] > bits[False]


@pytest.mark.parametrize(
    "knobs, message",
    [
        (dict(double_quant_scales=True, bits=8), "model.double_quant_scales=True stores"),
        (dict(double_quant_scales="yes"), "model.double_quant_scales='yes' is not a boolean"),
    ],
)
def test_bad_double_quant_scales_name_the_setting(knobs, message):
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        qalora_transformer(small_llama2, ["q_proj"], group_size=32, **knobs)


def test_every_model_builder_takes_bits_and_layers_record_it():
    import inspect

    from qalora_tune import models

    for name in models.__all__:
        builder = getattr(models, name)
        if name.startswith("qalora_") and name != "qalora_transformer":
            assert inspect.signature(builder).parameters["bits"].default == 4, name
            assert "bits (int)" in builder.__doc__, name
            assert inspect.signature(builder).parameters["double_quant_scales"].default is False
            assert "double_quant_scales (bool)" in builder.__doc__, name
    for bits in (2, 3, 4):
        with torch.device("meta"):
            model = qalora_transformer(small_llama2, ["q_proj"], group_size=32, bits=bits)
        assert {m.bits for m in model.modules() if isinstance(m, QuantizedLinear)} == {bits}
    with torch.device("meta"):
        model = qalora_llama3_2_1b(["q_proj"], bits=3)
    assert model.layers[0].attn.q_proj.bits == 3 and model.layers[0].mlp.w1.bits == 3


def test_a_group_size_that_fits_no_linear_lists_the_ones_that_do():
    # SMALL_SIZES: in_dims 64 (attention, w1, w3) and 96 (w2): only 32 divides both
    with torch.device("meta"), pytest.raises(ValueError) as info:
        qalora_transformer(small_llama2, ["q_proj"], group_size=64)
    message = str(info.value)
    assert "model.group_size=64 does not divide in_dim=96" in message
    assert "set model.group_size to 32, or set model.pad_in_dim=True" in message


def _builders():
    from qalora_tune import models

    sizes = dict(  # qalora_llama2 takes every size; the others fix them
        vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        intermediate_dim=128, max_seq_len=32,
    )
    return [
        pytest.param(
            partial(models.qalora_llama2, **sizes) if name == "qalora_llama2"
            else getattr(models, name),
            id=name,
        )
        for name in models.__all__
        if name.startswith("qalora_") and name != "qalora_transformer"
    ]


@pytest.mark.parametrize("builder", _builders())
def test_every_builder_takes_8_bits_and_group_size_8_as_intx_layers(builder):
    from qalora_tune.quantization.intx_weight import is_intx_weight

    with torch.device("meta"):
        # pad_in_dim: stories260K's intermediate_dim 172 is no multiple of 8
        model = builder(["q_proj", "v_proj"], apply_lora_to_mlp=True, group_size=8, bits=8, pad_in_dim=True)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert layers
    for module in layers:
        assert module.bits == 8 and module.group_size == 8
        assert is_intx_weight(module.weight) and module.weight.is_meta
        assert module.weight.target_dtype == torch.int8 and tuple(module.weight.block_size) == (1, 8)
        assert module.weight.scale.shape == (module.out_dim, module.padded_in_dim // 8)
    q_proj = model.layers[0].attn.q_proj
    assert isinstance(q_proj, QALoRALinear) and q_proj.lora_a.weight.shape[1] == q_proj.in_dim // 8


@pytest.mark.parametrize("group_size", [32, 64])
def test_8_bits_at_an_int4_group_size_is_intx_and_4_bits_at_group_8_too(group_size):
    from qalora_tune.quantization.intx_weight import is_intx_weight

    with torch.device("meta"):
        eight = qalora_transformer(small_llama2, ["q_proj"], group_size=32, bits=8)
        four = qalora_transformer(small_llama2, ["q_proj"], group_size=8, bits=4)
        int4 = qalora_transformer(small_llama2, ["q_proj"], group_size=32, bits=4)
    for model in (eight, four):
        assert all(is_intx_weight(m.weight) for m in model.modules() if isinstance(m, QuantizedLinear))
    assert all(is_int4_weight(m.weight) for m in int4.modules() if isinstance(m, QuantizedLinear))
    if group_size == 64:
        with torch.device("meta"):
            model = qalora_llama3_2_1b(["q_proj"], group_size=64, bits=8)
        assert is_intx_weight(model.layers[0].attn.q_proj.weight)
        assert is_intx_weight(model.layers[0].mlp.w2.weight)


def test_intx_model_matches_float64_reference_with_adapters():
    """bits=8, group_size=8 on CPU: the whole decoder against float64 (intx dense weights)."""
    from qalora_tune.ops.intx_linear import dequantize_intx

    torch.manual_seed(5)
    plain = small_llama2().eval()
    model = qalora_transformer(
        small_llama2, ["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=2, lora_alpha=4.0,
        group_size=8, bits=8,
    ).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QALoRALinear):
                module.lora_b.weight.copy_(torch.randn(module.lora_b.weight.shape, generator=gen) * 0.1)

    class _Float64IntxLinear(_Float64Linear):
        def __init__(self, layer):
            nn.Module.__init__(self)
            self.in_dim, self.padded = layer.in_dim, layer.padded_in_dim
            w = layer.weight  # the function the intx base stores, in float64
            self.weight = dequantize_intx(w.qdata, w.scale, w.zero_point, torch.float64)
            self.bias = None
            self.adapter = None
            if isinstance(layer, QALoRALinear):
                self.adapter = (
                    layer.lora_a.weight.detach().double(), layer.lora_b.weight.detach().double(),
                    layer.group_size, layer.scaling,
                )

    def reference(qalora):
        ref = _float64_reference(plain, small_llama2())  # norms in float64, linears replaced below
        for path, module in qalora.named_modules():
            if isinstance(module, QuantizedLinear):
                parent_path, _, leaf = path.rpartition(".")
                setattr(ref.get_submodule(parent_path), leaf, _Float64IntxLinear(module))
        return ref

    tokens = torch.randint(0, SMALL_SIZES["vocab_size"], (2, 12), generator=gen)
    with torch.no_grad():
        expected = reference(model)(tokens)
        out = model(tokens)
        without_adapter = reference(_zero_b_copy(model))(tokens)
        unquantized = _float64_reference(plain, plain)(tokens)
    scale = expected.abs().max()
    assert (out.double() - expected).abs().max() <= REL_TOL * scale
    assert (unquantized - without_adapter).abs().max() > 10 * REL_TOL * scale  # 8 bits: small
    assert (without_adapter - expected).abs().max() > 1000 * REL_TOL * scale


def test_eight_bit_scales_warn_where_they_cost_bits():
    """A float32 grid per row costs 64 bits; 8-bit codes save (b_s - 8) per group: fp32
    scales need more than 2.67 groups per row, bf16 ones more than 8."""
    import warnings

    from torchtune.training import set_default_dtype

    # SMALL_SIZES at G=32: rows of 2 groups (attention, w1, w3; 13 linears in 2 layers
    # with the output) and 3 (w2), fp32 scales
    with torch.device("meta"), pytest.warns(UserWarning, match="makes 13 of 15 linears larger"):
        qalora_transformer(small_llama2, ["q_proj"], group_size=32, double_quant_scales=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.device("meta"), set_default_dtype(torch.bfloat16):  # 64 and 172 groups
            qalora_llama3_2_1b(["q_proj"], group_size=32, double_quant_scales=True)


@pytest.mark.parametrize("num_layers", [0, -1, 33, 2.5, "two"])
def test_num_layers_out_of_range_is_refused_naming_the_setting(num_layers):
    from qalora_tune.errors import UserValueError
    from qalora_tune.models._knobs import check_num_layers

    with pytest.raises(UserValueError, match=r"model.num_layers=.* must be an integer from 1 to 32"):
        check_num_layers(num_layers, 32)
    check_num_layers(1, 32)
    check_num_layers(32, 32)
