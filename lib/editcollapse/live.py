"""The live edits of each model, and the model as it was before them.

Every editor records here the edits it applied and that are not undone, oldest first
(`editors.base`). An edit's `saved` tensors hold the values from before it wrote them, so the
first live edit that saved a tensor holds its unedited value: `unedited(lm)` puts the unedited
model back for a moment, without a copy of the model.

What an edit reads from the model itself, ROME's context templates and C = E[kkᵀ], is a property
of the unedited model, as in the papers' code, which computes both once, before any edit. Computed
inside `unedited`, they are the same whether edits came before or not: a sequential run resumed in
a new process, on its restored weights, gets what the uninterrupted run got. `fingerprint` names
the unedited weights that such a value depends on, for the caches on disk.
"""
from __future__ import annotations

import hashlib
import weakref
from contextlib import contextmanager

import torch

from .nethook import get_parameter

_LIVE: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def live_edits(lm) -> list:
    """The edits applied to this model and not undone, oldest first."""
    return list(_LIVE.get(lm.model, []))


def unedited_values(lm) -> dict[str, torch.Tensor]:
    """{parameter name: its value before the first live edit that wrote it}, for every edited parameter."""
    values: dict[str, torch.Tensor] = {}
    for result in _LIVE.get(lm.model, []):
        for name, value in result.saved.items():
            values.setdefault(name, value)
    return values


@contextmanager
def unedited(lm):
    """Inside the block the model has its unedited weights; after it, its edited ones again (bit-identical)."""
    values = unedited_values(lm)
    edited = {name: get_parameter(lm.model, name).detach().clone() for name in values}
    try:
        with torch.no_grad():
            for name, value in values.items():
                get_parameter(lm.model, name).copy_(value)
        yield lm
    finally:
        with torch.no_grad():
            for name, value in edited.items():
                get_parameter(lm.model, name).copy_(value)


def parameters_through(lm, layer: int) -> list[str]:
    """Names of the parameters that the input of `layer`'s MLP output projection can depend on: all
    but those of later layers (embeddings, layers 0..layer, and the head, which is harmless to include)."""
    later = tuple(lm.spec.module("layer", i) + "." for i in range(layer + 1, lm.n_layers))
    return [name for name, _ in lm.model.named_parameters() if not name.startswith(later)]


def fingerprint(lm, names: list[str]) -> str:
    """BLAKE2b of the unedited values (name, dtype, shape, bytes) of the named parameters: 16 hex digits."""
    values = unedited_values(lm)
    h = hashlib.blake2b(digest_size=8)
    for name in names:
        t = values.get(name, get_parameter(lm.model, name)).detach()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().data)
    return h.hexdigest()
