"""``tune run qalora_eval`` on TinyStories-656K for every checkpoint kind (subprocesses):
results files, merged vs adapter, int4 vs full precision, a float64 reference, the lm-eval
hook (with a stand-in lm_eval package) and one-line errors."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qalora_tune.data import text_file_dataset, text_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SHARED = (ROOT / ".." / "shared").resolve()
TUNE = str(Path(sys.executable).with_name("tune"))
MODEL = SHARED / "models" / "tinystories656K"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare_train.txt"
requires_shared = pytest.mark.skipif(
    not MODEL.is_dir(), reason="needs ../shared (real tiny checkpoints and data)"
)
KINDS = ("full", "quantized_base", "adapter", "merged")
DATASETS = (
    "tinyshakespeare_train:validation", "tinystories_val_a:validation", "alpaca_4500:validation"
)
BATCH_SIZE, MAX_BATCHES = 8, 2

# a stand-in for EleutherAI's lm_eval: just the names torchtune's eleuther_eval imports;
# its evaluate() drives the wrapper the way the harness does (encode, batch, call the model)
FAKE_LM_EVAL = {
    "lm_eval/__init__.py": "",
    "lm_eval/models/__init__.py": "",
    "lm_eval/models/huggingface.py": """
        import torch

        class HFLM:
            def __init__(self, pretrained, device="cuda", **kwargs):
                self.pretrained = pretrained
                self._device = torch.device(device)
        """,
    "lm_eval/models/hf_vlms.py": """
        from lm_eval.models.huggingface import HFLM

        class HFMultimodalLM(HFLM):
            pass
        """,
    "lm_eval/tasks/__init__.py": """
        class TaskManager:
            def __init__(self, include_path=None):
                self.include_path = include_path

        def get_task_dict(tasks, task_manager):
            return {name: object() for name in tasks}
        """,
    "lm_eval/evaluator.py": """
        def evaluate(lm, task_dict, limit=None):
            tokens, _ = lm.tok_batch_encode(["Once upon a time", "The cat sat"])
            logits = lm._model_call(tokens.to(lm.device))
            return {"results": {name: {
                "alias": name, "logits_shape": list(logits.shape), "limit": limit,
                "stop_tokens": lm._tokenizer.stop_tokens, "max_length": lm.max_length,
                "batch_size": lm.batch_size, "text": lm.tok_decode(lm.tok_encode("Once upon")),
            } for name in task_dict}}
        """,
    "lm_eval/utils.py": """
        def make_table(output):
            return "lm_eval table: " + ", ".join(output["results"])
        """,
    "lm_eval-0.4.9.dist-info/METADATA": "Metadata-Version: 2.1\nName: lm_eval\nVersion: 0.4.9\n",
}


def _env(**extra):
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def _tune(recipe, *args, env=None, timeout=600):
    return subprocess.run(
        [TUNE, "run", recipe, *args], cwd=ROOT, env=env or _env(), capture_output=True,
        text=True, timeout=timeout,
    )


def _eval_args(run: Path, kind: str, out: Path):
    # from the project root, the config's ../shared paths are the shared data
    return [
        "--config", "tinystories656K_qalora_eval", f"run_dir={run}", f"output_dir={out}",
        f"checkpoint.kind={kind}", f"batch_size={BATCH_SIZE}", f"max_batches={MAX_BATCHES}",
    ]


def _write_fake_lm_eval(root: Path) -> Path:
    for name, text in FAKE_LM_EVAL.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Train 3 steps, then evaluate the four kinds concurrently (the quantized base also
    runs a stand-in lm_eval task); returns ``{kind: (process, results or None, output_dir)}``."""
    if not MODEL.is_dir():
        pytest.skip("needs ../shared (real tiny checkpoints and data)")
    root = tmp_path_factory.mktemp("qalora_eval")
    run = root / "run"
    trained = _tune(
        "qalora_finetune", "--config", "tinystories656K_qalora", f"output_dir={run}",
        "max_steps_per_epoch=3", "batch_size=8", "validation.max_batches=1",
        "validation.full_precision_baseline=False", "merge_probe_size=4",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    fake = _write_fake_lm_eval(root / "fake_lm_eval")
    pythonpath = os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")]))
    processes = {}
    for kind in KINDS:
        args, env = _eval_args(run, kind, root / kind), _env()
        if kind == "quantized_base":
            args += ["lm_eval.tasks=[fake_task]", "lm_eval.limit=3", "lm_eval.max_seq_length=64"]
            env = _env(PYTHONPATH=pythonpath)
        processes[kind] = subprocess.Popen(
            [TUNE, "run", "qalora_eval", *args], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    outcome = {}
    for kind, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        process.stdout, process.stderr = stdout, stderr
        path = root / kind / "eval_results.json"
        results = json.loads(path.read_text()) if path.is_file() else None
        outcome[kind] = (process, results, root / kind)
    return outcome


def _results(evaluated, kind):
    process, results, _ = evaluated[kind]
    assert process.returncode == 0, process.stderr[-3000:]
    return results


@requires_shared
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_writes_every_dataset(evaluated, kind):
    results = _results(evaluated, kind)
    process, _, output_dir = evaluated[kind]
    assert results["checkpoint"]["kind"] == kind and results["dtype"] == "float32"
    assert list(results["datasets"]) == list(DATASETS)
    for name, row in results["datasets"].items():
        assert row["tokens"] > 0
        assert row["perplexity"] == pytest.approx(torch.tensor(row["nll"]).exp().item())
        assert f"  {name}" in process.stdout  # one printed line per dataset
    # text blocks: every position after the first is scored; Alpaca: the responses only
    text = results["datasets"]["tinyshakespeare_train:validation"]
    assert text["tokens"] == BATCH_SIZE * MAX_BATCHES * 127
    alpaca = results["datasets"]["alpaca_4500:validation"]
    assert 0 < alpaca["tokens"] < BATCH_SIZE * MAX_BATCHES * 511
    assert [p.name for p in output_dir.iterdir()] == ["eval_results.json"]  # no temporary left


@requires_shared
def test_merged_int4_matches_the_unmerged_adapter(evaluated):
    adapter, merged = _results(evaluated, "adapter"), _results(evaluated, "merged")
    for name in DATASETS:
        assert merged["datasets"][name]["perplexity"] == pytest.approx(
            adapter["datasets"][name]["perplexity"], rel=5e-3
        )
        assert merged["datasets"][name]["tokens"] == adapter["datasets"][name]["tokens"]


@requires_shared
def test_quantization_costs_perplexity_and_the_adapter_moves_it(evaluated):
    full, base, adapter = (
        _results(evaluated, k)["datasets"] for k in ("full", "quantized_base", "adapter")
    )
    # in domain (TinyStories, the base's pretraining text) int4 costs perplexity; out of
    # domain (Shakespeare, Alpaca: perplexities in the hundreds) its noise moves it either
    # way, by a few percent
    stories = "tinystories_val_a:validation"
    assert base[stories]["perplexity"] > full[stories]["perplexity"]
    for name in DATASETS:
        assert base[name]["perplexity"] != full[name]["perplexity"]
        assert base[name]["perplexity"] == pytest.approx(full[name]["perplexity"], rel=0.1)
        assert adapter[name]["perplexity"] != base[name]["perplexity"]


def _plain_torchtune_llama(dtype: torch.dtype) -> torch.nn.Module:
    """torchtune's llama2 with TinyStories-656K's sizes, loaded from the safetensors with
    torchtune's own key conversion: no qalora_tune code on the model path."""
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama2 import llama2

    config = json.loads((MODEL / "config.json").read_text())
    model = llama2(
        vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"],
        embed_dim=config["hidden_size"], intermediate_dim=config["intermediate_size"],
        max_seq_len=config["max_position_embeddings"], norm_eps=config["rms_norm_eps"],
        rope_base=config["rope_theta"],
    )
    state = hf_to_tune(
        load_file(str(MODEL / "model.safetensors")), num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"], dim=config["hidden_size"],
    )
    state["tok_embeddings.weight"] = state["output.weight"]  # tied embeddings
    model.load_state_dict(state)
    return model.to(dtype).eval()


@requires_shared
@pytest.mark.filterwarnings("ignore:Mismatch dtype")  # torchtune's RMSNorm computes in fp32
@torch.no_grad()
def test_full_precision_perplexity_equals_a_float64_reference(evaluated):
    results = _results(evaluated, "full")["datasets"]["tinyshakespeare_train:validation"]
    tokenizer = text_tokenizer(str(MODEL / "tokenizer.json"), prepend_space=False)
    dataset = text_file_dataset(tokenizer, str(SHAKESPEARE), block_size=128, split="validation")
    tokens = torch.tensor([dataset[i]["tokens"] for i in range(BATCH_SIZE * MAX_BATCHES)])
    model = _plain_torchtune_llama(torch.float64)
    nll, count = 0.0, 0
    for batch in tokens.split(BATCH_SIZE):
        logits = model(batch)
        nll += F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
        ).item()
        count += batch[:, 1:].numel()
    assert results["tokens"] == count
    assert results["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert results["perplexity"] == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-5)


@requires_shared
def test_lm_eval_tasks_run_through_torchtunes_wrapper(evaluated):
    process, results, _ = evaluated["quantized_base"]
    assert process.returncode == 0, process.stderr[-3000:]
    task = results["lm_eval"]["results"]["fake_task"]
    assert results["lm_eval"]["tasks"] == ["fake_task"] and task["limit"] == 3
    assert task["logits_shape"][0] == 2 and task["logits_shape"][2] == 2048  # our model's logits
    assert task["stop_tokens"] == [2] and task["max_length"] == 64
    assert task["batch_size"] == BATCH_SIZE
    assert task["text"] == "Once upon"
    assert "lm_eval table: fake_task" in process.stdout


def _error_line(result, recipe="qalora_eval"):
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith(f"{recipe}: error: ")
    return lines[-1]


@requires_shared
def test_unknown_kind_is_one_line(tmp_path):
    line = _error_line(_tune("qalora_eval", *_eval_args(tmp_path, "bf16", tmp_path / "out")))
    assert "checkpoint.kind='bf16'" in line and "full, quantized_base, adapter, merged" in line
    assert not (tmp_path / "out" / "eval_results.json").exists()


@requires_shared
def test_missing_adapter_dir_and_missing_lm_eval_are_one_line(tmp_path, monkeypatch, capsys):
    """In process (no start-up cost): ``main`` is what ``tune run`` calls."""
    import qalora_eval

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["qalora_eval"])
    args = _eval_args(tmp_path, "adapter", tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        qalora_eval.main(["qalora_eval", *args, f"checkpoint.adapter_dir={tmp_path / 'nope'}"])
    assert exit_info.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("qalora_eval: error: checkpoint.adapter_dir=")
    assert "does not exist" in line

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed: the not-installed message cannot be shown")
    with pytest.raises(SystemExit) as exit_info:
        qalora_eval.main(["qalora_eval", *_eval_args(tmp_path, "full", tmp_path / "out"),
                          "lm_eval.tasks=[hellaswag]"])
    assert exit_info.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("qalora_eval: error: lm_eval.tasks=['hellaswag']")
    assert "pip install lm_eval" in line and "HF_DATASETS_OFFLINE=1" in line
