"""YAML configs shipped with qalora-tune (``tune run qalora_finetune --config NAME``)."""
