"""The live edits of each model, and the model as it was before them.

Every editor records here the edits it applied and that are not undone, oldest first
(`editors.base`). An edit's `saved` tensors hold the values from before it wrote them, so the
first live edit that saved a tensor holds its unedited value: `unedited(lm)` puts the unedited
model back for a moment, without a copy of the model. A Ctrl-C while weights are being put back
waits until they all are (`sigint_deferred`), so a model is never left half restored.

What an edit reads from the model itself, ROME's context templates and C = E[kkᵀ], is a property
of the unedited model, as in the papers' code, which computes both once, before any edit. Computed
inside `unedited`, they are the same whether edits came before or not: a sequential run resumed in
a new process, on its restored weights, gets what the uninterrupted run got. `fingerprint` names
the unedited weights that such a value depends on, for the caches on disk.
"""
from __future__ import annotations

import hashlib
import signal
import threading
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
def sigint_deferred():
    """Hold Ctrl-C (SIGINT) until the block is done, then deliver it: a rollback is never left half done.
    Only the main thread receives SIGINT, so elsewhere (or under a handler not set from Python) it does nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)


@contextmanager
def unedited(lm):
    """Inside the block the model has its unedited weights; after it, its edited ones again (bit-identical)."""
    values = unedited_values(lm)
    edited = {name: get_parameter(lm.model, name).detach().clone() for name in values}
    try:
        with sigint_deferred(), torch.no_grad():
            for name, value in values.items():
                get_parameter(lm.model, name).copy_(value)
        yield lm
    finally:
        with sigint_deferred(), torch.no_grad():
            for name, value in edited.items():
                get_parameter(lm.model, name).copy_(value)


def parameters_through(lm, layer: int) -> list[str]:
    """Names of the parameters that the input of `layer`'s MLP output projection can depend on: all
    but those of later layers (embeddings, layers 0..layer, and the head, which is harmless to include)."""
    later = tuple(lm.spec.module("layer", i) + "." for i in range(layer + 1, lm.n_layers))
    return [name for name, _ in lm.model.named_parameters() if not name.startswith(later)]


def fingerprint(lm, names: list[str], memo: dict | None = None) -> str:
    """SHA-256 of the unedited values (name, dtype, shape, bytes) of the named parameters: 16 hex digits.

    `memo` ({name: digest}) shares the hashing of each parameter between several calls."""
    values = unedited_values(lm)
    memo = {} if memo is None else memo
    h = hashlib.sha256()
    for name in names:
        if name not in memo:
            t = values.get(name, get_parameter(lm.model, name)).detach()
            memo[name] = hashlib.sha256(f"{t.dtype}|{list(t.shape)}|".encode()
                                        + t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()).digest()
        h.update(name.encode() + b"|" + memo[name])
    return h.hexdigest()[:16]
