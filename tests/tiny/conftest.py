import pytest

from qalora_tune.tiny import prepare_tiny_base


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny base made with a handful of steps (the real default trains far longer)."""
    path = tmp_path_factory.mktemp("tiny") / "base"
    return prepare_tiny_base(str(path), steps=3, batch_size=8, num_validation=16, log=None)
