"""The editor contract: requests, results with an exact and ordered undo, atomic application.

`editor.apply(lm, requests)` takes one `EditRequest` or a batch, changes a few weight tensors
of the live model in place and returns an `EditResult`. The contract, the same for every editor:

- **Validated first.** A bad request or setting raises `EditError` before any weight is written:
  among others a prompt longer than the model's positions, or edited layers whose weights already
  hold NaN or inf.
- **Atomic.** Before it writes a tensor, the editor saves a clone of it (`WeightTransaction`).
  If anything raises before the result is returned (a NaN, an error in the diagnostics, a
  KeyboardInterrupt), the saved tensors are copied back before the exception propagates. A Ctrl-C
  during that rollback, or during an undo, waits until it is complete (`sigint_deferred`).
- **Exact, ordered undo.** `EditResult.undo()` copies the saved tensors back: bit-identical
  weights, with no copy of the model. Each model keeps the list of its live edits; only the
  most recent one can be undone (last applied, first undone), anything else is refused.
- **Common diagnostics.** Every result carries, per touched tensor, ‖W‖, ‖ΔW‖, ‖ΔW‖/‖W‖ and
  the largest entries of ΔW (`diagnostics["tensors"]`), their totals (`delta_norm`,
  `rel_change`, `n_tensors`) and the editor's own keys beside them; `scalars()` gives the flat
  scalar part that a results row stores.

An editor's settings are a `HyperParams` dataclass whose fields declare their type and range with
`setting(...)`, checked in one place; its `presets` (model name -> settings, the papers' where they
exist) and the `hparams` overrides meet in `Editor.hparams_for`. `Editor.on_phase` reports the
phases of an apply as they start and end (progress bars).
"""
from __future__ import annotations

import math
import reprlib
import time
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from typing import Callable, Sequence

import torch
from transformers.pytorch_utils import Conv1D

from ..errors import EditError
from ..models.live import _LIVE, sigint_deferred
from ..models.loading import LoadedModel
from ..models.nethook import get_parameter
from ..request import EditRequest
from ..models.tokens import target_ids

TOP_ENTRIES = 5


def as_requests(requests) -> tuple[EditRequest, ...]:
    """One request or a non-empty sequence of them, as a tuple."""
    if isinstance(requests, EditRequest):
        return (requests,)
    if isinstance(requests, Sequence) and not isinstance(requests, str) and requests \
            and all(isinstance(r, EditRequest) for r in requests):
        return tuple(requests)
    raise EditError(f"expected an EditRequest or a non-empty list of them, got {type(requests).__name__}")


@dataclass
class EditResult:
    """An applied edit: what changed, why, and how to take it back."""

    requests: tuple[EditRequest, ...]
    editor: str
    saved: dict[str, torch.Tensor] = field(repr=False)  # parameter name -> its value before the edit
    lm: LoadedModel = field(repr=False)
    diagnostics: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    # set by an editor with a test-time prefix (C-ROME's option, Fall of ROME Sec. 5): the metrics evaluate its
    # prompts behind this prefix too
    test_prefix: str | None = None
    undone: bool = False

    @property
    def request(self) -> EditRequest:
        """The request of a single edit."""
        if len(self.requests) != 1:
            raise AttributeError(f"this {self.editor} result holds {len(self.requests)} requests; use .requests")
        return self.requests[0]

    def scalars(self) -> dict:
        """The scalar diagnostics (common and editor-specific), for a results row."""
        return {k: v for k, v in self.diagnostics.items() if isinstance(v, (bool, int, float, str))}

    def undo(self) -> None:
        """Restore the saved tensors exactly (bit-identical); again: nothing. Only the latest live edit can be undone."""
        if self.undone:
            return
        live = _LIVE.get(self.lm.model, [])
        if not live or live[-1] is not self:
            later = len(live) - 1 - live.index(self) if self in live else "unknown"
            raise EditError(f"undo out of order: {later} later edit(s) of this model are still applied; "
                            f"undo them first (last applied, first undone), e.g. with an EditStack")
        with sigint_deferred():
            _restore(self.lm, self.saved)
            live.pop()
            self.undone = True


def _restore(lm: LoadedModel, saved: dict[str, torch.Tensor]) -> None:
    with sigint_deferred(), torch.no_grad():
        for name, value in saved.items():
            get_parameter(lm.model, name).copy_(value)


class WeightTransaction:
    """Saves each tensor before its first write; `restore()` puts every saved tensor back."""

    def __init__(self, lm: LoadedModel):
        self.lm, self.saved = lm, {}

    def param(self, name: str) -> torch.nn.Parameter:
        """The parameter `name`, saved first (call before writing to it)."""
        p = get_parameter(self.lm.model, name)
        if name not in self.saved:
            self.saved[name] = p.detach().clone()
        return p

    def add_(self, name: str, delta: torch.Tensor) -> None:
        """W += ΔW (ΔW in W's own layout), after saving W."""
        p = self.param(name)
        with torch.no_grad():
            p.add_(delta.to(device=p.device, dtype=p.dtype))

    def restore(self) -> None:
        _restore(self.lm, self.saved)


def tensor_changes(lm: LoadedModel, saved: dict[str, torch.Tensor], top: int = TOP_ENTRIES) -> dict:
    """The common diagnostics: per touched tensor ‖W‖, ‖ΔW‖, ‖ΔW‖/‖W‖, largest |ΔW| entries; and totals."""
    tensors, sq_delta, sq_w = {}, 0.0, 0.0
    with torch.no_grad():
        for name, before in saved.items():
            delta = (get_parameter(lm.model, name) - before).float()
            w, d = before.float().norm().item(), delta.norm().item()
            values, flat = delta.abs().flatten().topk(min(top, delta.numel()))
            where = [list(map(int, torch.unravel_index(i, delta.shape))) for i in flat]
            tensors[name] = dict(shape=list(delta.shape), norm=w, delta_norm=d, rel_change=d / w if w else float("inf"),
                                 delta_max_abs=values[0].item() if len(values) else 0.0,
                                 top=[dict(index=ix, value=delta[tuple(ix)].item()) for ix in where])
            sq_delta, sq_w = sq_delta + d * d, sq_w + w * w
    bad = [n for n, t in tensors.items() if not math.isfinite(t["delta_norm"])]
    if bad:
        raise EditError(f"non-finite weight change in {', '.join(bad)}")
    return dict(tensors=tensors, n_tensors=len(tensors), delta_norm=sq_delta ** 0.5,
                rel_change=(sq_delta / sq_w) ** 0.5 if sq_w else 0.0)


@dataclass(frozen=True)
class Spec:
    """What one setting may hold: an int or a finite number (`kind`) `at_least` or `above` a bound, a bool,
    one of `choices`, or what `convert` accepts (it returns the value to keep, or raises an EditError
    "<name> must be ..."); `optional`: None too."""

    kind: type
    at_least: float | None = None
    above: float | None = None
    optional: bool = False
    choices: tuple = ()
    convert: Callable | None = None

    def check(self, owner: str, name: str, value):
        """The value to keep; EditError "<owner>.<name> must be ..." when it is not one."""
        if value is None and self.optional:
            return value
        if self.convert is not None:
            try:
                return self.convert(value)
            except EditError as e:
                raise EditError(f"{owner}.{e}") from None
        if not self.accepts(value):
            raise EditError(f"{owner}.{name} must be {self.describe()}, got {value!r}")
        return value

    def accepts(self, v) -> bool:
        if self.choices:
            return v in self.choices
        if self.kind is bool:
            return isinstance(v, bool)
        number = int if self.kind is int else (int, float)
        if isinstance(v, bool) or not isinstance(v, number) or not math.isfinite(v):
            return False
        return (self.at_least is None or v >= self.at_least) and (self.above is None or v > self.above)

    def describe(self) -> str:
        if self.choices:
            return f"one of {self.choices}"
        if self.kind is bool:
            return "a bool"
        if self.kind is int:
            return f"an int >= {self.at_least}"
        bound = f">= {float(self.at_least)}" if self.above is None else f"> {float(self.above)}"
        return f"a number {bound} (finite)"


def setting(kind: type, default=MISSING, *, at_least=None, above=None, optional=False, choices=(), convert=None):
    """A HyperParams field and its Spec, e.g. `lr: float = setting(float, 5e-4, above=0)`."""
    return field(default=default, metadata={"spec": Spec(kind, at_least, above, optional, choices, convert)})


@dataclass(frozen=True, kw_only=True)
class HyperParams:
    """An editor's settings (frozen): each field declared with `setting` is checked (and normalised) when built."""

    def __post_init__(self):
        for f in fields(self):
            if "spec" in f.metadata:
                value = f.metadata["spec"].check(type(self).__name__, f.name, getattr(self, f.name))
                object.__setattr__(self, f.name, value)


def layer_list(layers) -> tuple[int, ...]:
    """A setting's layers R as a tuple: a non-empty increasing list of distinct layer indices >= 0."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__") or not layers or any(
            isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers) \
            or list(layers) != sorted(set(layers)):
        raise EditError(f"layers must be a non-empty increasing list of distinct layer indices >= 0, got {layers!r}")
    return tuple(layers)


def param_delta(lm: LoadedModel, module_name: str, delta: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(weight name, ΔW in the parameter's layout) for a [d_out, d_in] update of a linear module.

    GPT-2's Conv1D stores W as [d_in, d_out], so its ΔW is transposed.
    """
    module = lm.model.get_submodule(module_name)
    return module_name + ".weight", delta.T if isinstance(module, Conv1D) else delta


def check_layer(lm: LoadedModel, layer: int) -> None:
    if not 0 <= layer < lm.n_layers:
        raise EditError(f"layer {layer} out of range for {lm.spec.name} ({lm.n_layers} layers)")


def check_length(lm: LoadedModel, request: EditRequest) -> None:
    """Refuse a request whose prompt and target (the longest text an edit runs without a context) do not fit
    in the model's positions."""
    n = len(lm.token_ids(request.template().format(request.subject))) + len(target_ids(lm, request.target_new)) - 1
    lm.check_fits(n, f"prompt {reprlib.repr(request.prompt)} with target {reprlib.repr(request.target_new)}", EditError)


def check_finite(lm: LoadedModel, layers) -> None:
    """Refuse to edit layers whose weights already hold NaN or inf: the model was broken before the edit."""
    for layer in layers:
        check_layer(lm, layer)
        block = lm.spec.module("layer", layer)
        bad = [f"{block}.{n}" for n, p in lm.model.get_submodule(block).named_parameters() if not p.isfinite().all()]
        if bad:
            raise EditError(f"the model's weights were already broken before this edit: {', '.join(bad)} hold "
                            f"NaN or inf; reload the model (or undo the edit that broke it)")


class Editor:
    """Base class of the editors. Subclasses set `name` (or a property) and `batched`, and implement

        _edit(lm, requests, tx) -> diagnostics: dict

    writing weights only through `tx` (a WeightTransaction) and timing their phases with `self.timed`.
    An editor with settings sets `hyperparams` (its HyperParams class) and `presets`, and takes the
    overrides as a dataclass field `hparams`, checked when it is built (`__post_init__`).
    """

    name: str = "editor"
    batched: bool = False  # True: one apply edits a batch of facts at once (MEMIT, AlphaEdit, FT-L∞, MEND)
    # diagnostics ({key: tensor rows}) of its live edits that its later edits read, e.g. AlphaEdit's
    # preserved keys: a resumed sequential run restores them (sequential.carried_state)
    carries: tuple[str, ...] = ()
    hyperparams: type[HyperParams] | None = None
    presets: dict[str, dict] = {}  # model name -> settings
    phase_callbacks: tuple[Callable[[str, bool], None], ...] = ()

    def __post_init__(self):
        """Refuse unknown or ill-typed `hparams` when the editor is built (before any model is seen)."""
        cls, overrides = self.hyperparams, self.hparams
        if not isinstance(overrides, dict):
            raise EditError(f"hparams must be a dict, got {type(overrides).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise EditError(f"unknown {cls.__name__} setting(s) {unknown}; known: {', '.join(sorted(known))}")
        cls(**{**next(iter(self.presets.values())), **overrides})  # HyperParams checks every value

    def hparams_for(self, lm: LoadedModel) -> HyperParams:
        """The settings for this model: its preset with `hparams` on top; every setting when it has no preset."""
        cls, preset = self.hyperparams, self.presets.get(lm.spec.name)
        if preset is None:
            try:
                return cls(**self.hparams)
            except TypeError as e:
                raise EditError(f"no {cls.__name__} preset for model {lm.spec.name!r} (presets: "
                                f"{', '.join(self.presets)}); pass every required setting in hparams ({e})") from e
        return cls(**{**preset, **self.hparams})

    def checked(self, lm: LoadedModel, requests) -> tuple[EditRequest, ...]:
        """The requests as a tuple, after the checks that refuse an edit (EditError) before any weight is written."""
        requests = as_requests(requests)
        if len(requests) > 1 and not self.batched:
            raise EditError(f"{self.name} edits one fact at a time; apply a sequence with an EditStack, "
                            f"or use a batched editor (MEMIT, AlphaEdit)")
        for r in requests:
            r.validate()
            check_length(lm, r)
        check_finite(lm, self.edited_layers(lm))
        return requests

    def apply(self, lm: LoadedModel, requests) -> EditResult:
        requests = self.checked(lm, requests)
        tx = WeightTransaction(lm)
        self.clock = {}
        t0 = time.perf_counter()
        try:
            diagnostics = self._edit(lm, requests, tx)
            diagnostics.update(tensor_changes(lm, tx.saved))
            self.clock["total"] = time.perf_counter() - t0
            result = EditResult(requests, self.name, tx.saved, lm, diagnostics, dict(self.clock))
            _LIVE.setdefault(lm.model, []).append(result)
        except BaseException:
            tx.restore()
            raise
        return result

    def _edit(self, lm: LoadedModel, requests: tuple[EditRequest, ...], tx: WeightTransaction):
        raise NotImplementedError

    def edited_layers(self, lm: LoadedModel) -> tuple[int, ...]:
        """The layers an apply writes to (checked for NaN and inf first): its settings' `layers`, or `layer`;
        none for an editor without settings. Editors laid out otherwise override it."""
        if self.hyperparams is None:
            return ()
        hp = self.hparams_for(lm)
        return tuple(hp.layers) if hasattr(hp, "layers") else (hp.layer,)

    def trained_on(self, lm: LoadedModel, case: dict) -> bool:
        """Whether this editor was trained on `case` (MEND: its training split), so that its scores on
        the case are not held-out scores. Editors that are not trained: never."""
        return False

    def on_phase(self, callback: Callable[[str, bool], None]) -> None:
        """Call `callback(phase, started)` as each phase of an apply starts (True) and ends (False)."""
        self.phase_callbacks = (*self.phase_callbacks, callback)

    @contextmanager
    def timed(self, phase: str):
        """`with self.timed("keys"): ...` adds the block's seconds to `self.clock[phase]`, between the calls
        of the `on_phase` callbacks."""
        for callback in self.phase_callbacks:
            callback(phase, True)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.clock[phase] = self.clock.get(phase, 0.0) + time.perf_counter() - t0
            for callback in self.phase_callbacks:
                callback(phase, False)


def apply_state(lm: LoadedModel, tensors: dict[str, torch.Tensor], label: str = "state") -> EditResult:
    """Write the given parameter values as one undoable edit (a resumed sequential run's saved weights)."""
    tx = WeightTransaction(lm)
    try:
        for name, value in tensors.items():
            p = tx.param(name)
            if p.shape != value.shape:
                raise EditError(f"saved {name} has shape {list(value.shape)}, the model's {list(p.shape)}")
            with torch.no_grad():
                p.copy_(value)
        result = EditResult((), label, tx.saved, lm, tensor_changes(lm, tx.saved))
        _LIVE.setdefault(lm.model, []).append(result)
    except BaseException:
        tx.restore()
        raise
    return result


@contextmanager
def edited(lm: LoadedModel, requests, editor: Editor):
    """`with edited(lm, request, ROME()) as result:` the model is edited inside, restored after."""
    result = editor.apply(lm, requests)
    try:
        yield result
    finally:
        result.undo()
