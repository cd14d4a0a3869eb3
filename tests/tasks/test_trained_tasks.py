"""Three tasks trained on different data, on real tiny models, at 2, 3 and 4 bits: the base
switched to task k is bit for bit task k's own merged model.

- TinyStories-656K (``../shared``) adapted to Tiny Shakespeare, to Alpaca responses and to
  TinyStories text;
- the embedded tiny llama (a quickly pretrained base) adapted three ways: different
  training sentences, and different adapters (every linear, attention q/v only, the MLP
  only at another rank), so a switch must also reset layers the next task never adapted.

Adapters train a few AdamW steps in process (the recipe's loss: next-token cross-entropy
on the labelled tokens), merge, and leave through the training recipe's writer
(``QALoRACheckpointer.write_merged``); the task-free base is the same quantization without
adapters, written the same way.
"""

import itertools
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchtune import training

import qalora_tune
from qalora_tune._compat import get_component_from_path
from qalora_tune.checkpointing import AdapterConfig, QALoRACheckpointer
from qalora_tune.data import instruct_json_dataset, text_file_dataset, text_tokenizer
from qalora_tune.models import qalora_tinystories656k
from qalora_tune.modules import QALoRALinear
from qalora_tune.tasks import export_task, export_task_from_merged, read_task_package
from qalora_tune.tiny import TinyTokenizer, prepare_tiny_base, qalora_tiny_llama, tiny_task_dataset
from tests.tasks.family import assert_same_model

ROOT = Path(__file__).resolve().parents[2]
SHARED = (ROOT / ".." / "shared").resolve()
MODEL = SHARED / "models" / "tinystories656K"
DATA = SHARED / "data"
ATTENTION = ["q_proj", "k_proj", "v_proj", "output_proj"]
IGNORE_INDEX = -100

pytestmark = pytest.mark.heavy


def _batches(dataset, pad_id, batch_size=2, count=3):
    collate = partial(
        get_component_from_path("torchtune.data.padded_collate_sft"),
        padding_idx=pad_id, ignore_idx=IGNORE_INDEX,
    )
    # examples with labelled tokens (a long Alpaca prompt can leave none at max_seq_len)
    examples = (dataset[i] for i in range(len(dataset)))
    labelled = (e for e in examples if any(label != IGNORE_INDEX for label in e["labels"][1:]))
    kept = list(itertools.islice(labelled, batch_size * count))
    return [collate(kept[j * batch_size:(j + 1) * batch_size]) for j in range(count)]


def _train_and_merge(model, batches, lr=1e-2):
    """A few AdamW steps on the adapters (next-token loss on labelled tokens), then merge."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for batch in batches:
        logits = model(batch["tokens"])
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for layer in model.modules():
        if isinstance(layer, QALoRALinear):
            layer.merge()
    return losses


def _write(checkpointer, model, directory, spec):
    """The training recipe's writer, in the default merged format (intx on CPU)."""
    directory.mkdir(parents=True)
    metadata = AdapterConfig(rank=1, alpha=1.0, group_size=spec["group_size"], bits=spec["bits"], model=spec)
    checkpointer.write_merged(directory, model, metadata, {})
    return directory


def _write_base(checkpointer, builder, path, bits, root):
    """The task-free base (``builder`` without adapters) written by the training writer;
    returns its directory and the model spec every task's merged model records."""
    spec = {
        "_component_": path, "lora_attn_modules": [],
        "apply_lora_to_mlp": False, "apply_lora_to_output": False, "group_size": 32, "bits": bits,
    }
    base = builder([], False, False, group_size=32, bits=bits)
    checkpointer.load_base(base)
    return _write(checkpointer, base.eval(), root / "base", spec), spec


def _check_tasks(root, base_dir, merged_dirs, trained_models, key_map, hf_config):
    packages = []
    for k, merged in enumerate(merged_dirs):
        export_task_from_merged(merged, root / f"task_{k}")
        # the table of the trained model in memory, as its files hold it, is that of its files
        export_task(
            trained_models[k], root / f"mem_{k}", key_map=key_map, hf_config=hf_config,
            merged_format="auto",
        )
        a, b = read_task_package(root / f"task_{k}"), read_task_package(root / f"mem_{k}")
        assert a.base["fingerprint"] == b.base["fingerprint"]
        assert all(torch.equal(a.zeros[key], b.zeros[key]) for key in a.zeros)
        packages.append(root / f"task_{k}")
    fingerprints = {read_task_package(p).base["fingerprint"] for p in packages}
    assert len(fingerprints) == 1  # one base under all tasks
    tables = [read_task_package(p).zeros for p in packages]
    for i in range(3):  # the tasks differ, from the base and from each other
        for j in range(i):
            assert any(not torch.equal(tables[i][key], tables[j][key]) for key in tables[i])
    model = qalora_tune.load_merged(base_dir, task=packages[0])
    owns = [qalora_tune.load_merged(path) for path in merged_dirs]
    tokens = torch.randint(3, 50, (2, 24))
    for k in (0, 1, 2, 1, 0, 2):
        model.load_task(packages[k])
        assert_same_model(model, owns[k])
        with torch.no_grad():
            assert torch.equal(model(tokens), owns[k](tokens))


@pytest.mark.skipif(not MODEL.is_dir(), reason="needs ../shared (real tiny checkpoints and data)")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tinystories656k_shakespeare_alpaca_tinystories_tasks_switch_exactly(tmp_path, bits):
    tokenizer = text_tokenizer(str(MODEL / "tokenizer.json"), prepend_space=False)
    data = {
        "shakespeare": text_file_dataset(tokenizer, str(DATA / "tinyshakespeare_train.txt"), block_size=64),
        "alpaca": instruct_json_dataset(tokenizer, str(DATA / "alpaca_4500.json"), max_seq_len=128),
        "tinystories": text_file_dataset(tokenizer, str(DATA / "tinystories_val_a.txt"), block_size=64),
    }
    checkpointer = QALoRACheckpointer(str(MODEL), "LLAMA2", str(tmp_path / "run"))
    base_dir, spec = _write_base(
        checkpointer, qalora_tinystories656k, "qalora_tune.models.qalora_tinystories656k", bits, tmp_path
    )
    merged, models = [], []
    torch.manual_seed(0)
    for name, dataset in data.items():
        model = qalora_tinystories656k(
            ATTENTION, apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8, group_size=32, bits=bits
        )
        checkpointer.load_base(model)
        losses = _train_and_merge(model, _batches(dataset, tokenizer.pad_id))
        assert all(map(torch.isfinite, map(torch.tensor, losses))), (name, losses)
        merged.append(_write(checkpointer, model.eval(), tmp_path / name, spec))
        models.append(model)
    _check_tasks(tmp_path, base_dir, merged, models, checkpointer.key_map, checkpointer.hf_config)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "base"
    return prepare_tiny_base(str(path), steps=30, batch_size=16, num_validation=16, log=None)


TINY_VARIANTS = [  # (training sentences seed, adapted attention, mlp, output, rank)
    (1, ATTENTION, True, True, 4),
    (2, ["q_proj", "v_proj"], False, False, 2),
    (3, [], True, False, 8),
]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tiny_qalora_variants_switch_exactly(tmp_path, tiny_base, bits):
    checkpointer = QALoRACheckpointer(tiny_base, "LLAMA2", str(tmp_path / "run"))
    tokenizer = TinyTokenizer()
    base_dir, spec = _write_base(
        checkpointer, qalora_tiny_llama, "qalora_tune.tiny.qalora_tiny_llama", bits, tmp_path
    )
    merged, models = [], []
    torch.manual_seed(0)
    for seed, attention, mlp, output, rank in TINY_VARIANTS:
        with training.set_default_dtype(torch.float32):
            model = qalora_tiny_llama(
                attention, apply_lora_to_mlp=mlp, apply_lora_to_output=output, lora_rank=rank,
                lora_alpha=2.0 * rank, group_size=32, bits=bits,
            )
        checkpointer.load_base(model)
        dataset = tiny_task_dataset(tokenizer, "train", num_examples=32, seed=seed)
        _train_and_merge(model, _batches(dataset, tokenizer.pad_id, batch_size=8), lr=3e-2)
        merged.append(_write(checkpointer, model.eval(), tmp_path / f"variant_{seed}", spec))
        models.append(model)
    _check_tasks(tmp_path, base_dir, merged, models, checkpointer.key_map, checkpointer.hf_config)
