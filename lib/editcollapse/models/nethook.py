"""Read and replace a module's input and output with forward hooks (after baukit's nethook).

    with Trace(model, "model.layers.5.mlp.down_proj", retain_input=True) as t:
        model(**batch)
    k = t.input            # the key k, [batch, seq, d_k]

    with Trace(model, "model.layers.5.mlp", edit_output=lambda out: out + delta):
        model(**batch)     # the MLP's value v replaced by v + delta
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Callable

import torch


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise LookupError(f"model has no module {name!r}") from e


def get_parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError as e:
        raise LookupError(f"model has no parameter {name!r}") from e


def _first(x):
    return x[0] if isinstance(x, tuple) else x


class Trace:
    """Hook one module: keep its first input and/or output, optionally rewrite the output.

    `edit_output(out) -> out` sees the module's output (the first element if a tuple) and
    returns its replacement. `stop=True` raises after the module ran, skipping the rest of
    the forward pass (use when only this module's activations are needed).
    """

    def __init__(self, model, layer: str, retain_input: bool = False, retain_output: bool = False,
                 edit_output: Callable | None = None, detach: bool = True, stop: bool = False):
        self.input = self.output = None
        module = get_module(model, layer)

        def hook(mod, inputs, output):
            if retain_input:
                self.input = inputs[0].detach() if detach else inputs[0]
            if edit_output is not None:
                new = edit_output(_first(output))
                output = (new, *output[1:]) if isinstance(output, tuple) else new
            if retain_output:
                o = _first(output)
                self.output = o.detach() if detach else o
            if stop:
                raise StopForward
            return output

        self._handle = module.register_forward_hook(hook)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._handle.remove()
        return exc_type is StopForward


class TraceDict(dict):
    """Several `Trace`s at once, keyed by module name; `stop=True` stops after the last one listed."""

    def __init__(self, model, layers: list[str], stop: bool = False, **kwargs):
        super().__init__()
        self._stack = ExitStack()
        for i, name in enumerate(layers):
            self[name] = self._stack.enter_context(
                Trace(model, name, stop=stop and i == len(layers) - 1, **kwargs))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._stack.close()
        return exc_type is StopForward


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; swallowed by Trace/TraceDict."""
