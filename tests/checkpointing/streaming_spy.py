"""A spy over a checkpoint tensor iterator: which earlier tensors are still alive when each
new one is read (the streaming loaders must free each tensor before the one after next)."""

import weakref
from typing import Callable, Iterator, List, Tuple

import torch


def liveness_spy(
    original: Callable[..., Iterator[Tuple[str, torch.Tensor]]], alive_when_read: List[List[str]]
) -> Callable[..., Iterator[Tuple[str, torch.Tensor]]]:
    """Wrap ``original``; for every tensor read, append the keys of older tensors (other than
    tied embeddings, which are kept on purpose) still alive to ``alive_when_read``."""

    def spying_iter(files):
        refs = []
        for key, tensor in original(files):
            # the loader's loop variable may still hold the previous tensor
            older = [k for k, r in refs[:-1] if r() is not None and "embed" not in k]
            alive_when_read.append(older)
            refs.append((key, weakref.ref(tensor)))
            yield key, tensor
            del tensor

    return spying_iter
