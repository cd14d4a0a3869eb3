"""``check_config``: unknown keys, components that do not import and arguments a component
does not take are refused before a recipe runs, with a did-you-mean; every packaged config
passes with its recipe's keys."""

import pytest
from omegaconf import OmegaConf
from qalora_eval import CONFIG_KEYS as EVAL_KEYS
from qalora_finetune import CONFIG_KEYS as FINETUNE_KEYS
from qalora_generate import CONFIG_KEYS as GENERATE_KEYS
from qalora_merge import CONFIG_KEYS as MERGE_KEYS

from qalora_tune.recipe_utils import check_config, packaged_config_names, resolve_config


def _tiny(**overrides):
    return OmegaConf.merge(OmegaConf.load(resolve_config("tiny_qalora")), overrides)


def _message(cfg, keys=FINETUNE_KEYS, recipe="qalora_finetune"):
    with pytest.raises(ValueError) as error:
        check_config(cfg, keys, recipe)
    return str(error.value)


@pytest.mark.parametrize("name", packaged_config_names())
def test_every_packaged_config_passes_with_its_recipes_keys(name):
    cfg = OmegaConf.load(resolve_config(name))
    if name.endswith("_generate"):
        check_config(cfg, GENERATE_KEYS, "qalora_generate")
    elif name.endswith("_eval"):
        check_config(cfg, EVAL_KEYS, "qalora_eval")
    else:
        check_config(cfg, FINETUNE_KEYS, "qalora_finetune")
        check_config(OmegaConf.merge(cfg, {"adapter_dir": "/a"}), MERGE_KEYS, "qalora_merge")


def test_finetune_keys_include_what_the_recipe_reads():
    assert {"save_every_n_steps", "resume_from_checkpoint", "validation.max_batches"} <= set(
        FINETUNE_KEYS
    )
    assert {"adapter_dir", "merged_dir"} <= set(MERGE_KEYS) and set(FINETUNE_KEYS) <= set(MERGE_KEYS)


def test_unknown_top_level_key_suggests_the_close_one():
    message = _message(_tiny(epoch=2))
    assert message == "unknown config key epoch: qalora_finetune does not read it; did you mean epochs?"


def test_unknown_key_without_a_close_one_lists_the_known_keys():
    message = _message(_tiny(zzz_unrelated=1))
    assert message.startswith("unknown config key zzz_unrelated: qalora_finetune does not read it")
    assert "remove it (known keys: batch_size, calibration, checkpointer," in message


def test_unknown_key_of_a_plain_section_is_refused():
    message = _message(_tiny(validation={"max_batch": 1}))
    assert message.endswith("did you mean validation.max_batches?")


def test_a_key_used_only_by_interpolation_is_allowed():
    check_config(_tiny(base_dir="/x", output_dir="${base_dir}/out"), FINETUNE_KEYS, "qalora_finetune")


@pytest.mark.parametrize(
    "component, suggestion",
    [
        ("qalora_tune.models.qalora_llama2_7bb", "qalora_tune.models.qalora_llama2_7b"),
        ("qalora_tune.model.qalora_llama2_7b", "qalora_tune.models.qalora_llama2_7b"),
        ("qalora_tun.models.qalora_llama2_7b", "qalora_tune.models.qalora_llama2_7b"),
    ],
)
def test_a_misspelled_component_suggests_the_importable_one(component, suggestion):
    message = _message(_tiny(model={"_component_": component}))
    assert message == (
        f"model._component_='{component}' cannot be imported; did you mean {suggestion}?"
    )


def test_nested_and_listed_components_are_checked():
    cfg = _tiny(validation={"dataset": {"_component_": "qalora_tune.tiny.tiny_task_datset"}})
    assert "validation.dataset._component_=" in _message(cfg)
    cfg = _tiny()
    cfg.dataset = [cfg.dataset, {"_component_": "qalora_tune.tiny.tiny_task_dataset", "splitt": "x"}]
    assert _message(cfg).startswith("dataset[1].splitt is not an argument of tiny_task_dataset")


def test_an_unknown_argument_suggests_the_parameter():
    message = _message(_tiny(model={"lora_rnk": 4}))
    assert message == "model.lora_rnk is not an argument of qalora_tiny_llama; did you mean lora_rank?"


def test_arguments_the_recipe_passes_positionally_are_not_required():
    # optimizer(params, ...), dataset(tokenizer, ...), lr_scheduler(optimizer, ...) as in the
    # packaged config: nothing to flag although those parameters are absent
    check_config(_tiny(), FINETUNE_KEYS, "qalora_finetune")


def test_components_taking_kwargs_accept_any_argument():
    cfg = _tiny(metric_logger={"anything": 1})  # DiskLogger(log_dir, filename=None, **kwargs)
    check_config(cfg, FINETUNE_KEYS, "qalora_finetune")


def test_a_component_set_to_null_says_how_to_drop_the_section():
    # torchtune turns ``prepare_base=null`` on the command line into prepare_base._component_=None
    message = _message(_tiny(prepare_base={"_component_": None}))
    assert message == (
        "prepare_base._component_ must be a dotted import path, got None; set it to one, or "
        "remove prepare_base from the YAML (torchtune cannot drop a component from the "
        "command line)"
    )
