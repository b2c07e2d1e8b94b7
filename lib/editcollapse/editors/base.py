"""What every editor shares: the request, the result with its exact undo, the `edited` context.

An editor changes a few weight tensors of a live model in place. Before it writes, it
saves a clone of exactly the tensors it touches; `EditResult.undo()` copies them back, so
the model returns to bit-identical weights without copying or reloading the model.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..models import LoadedModel
from ..nethook import get_parameter


class EditError(ValueError):
    """A request that cannot be applied; the model is left untouched."""


@dataclass(frozen=True)
class EditRequest:
    """Rewrite (subject, relation) -> target_new. `prompt` contains the subject (or '{}' in its place)."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | None = None

    @classmethod
    def from_case(cls, case: dict) -> "EditRequest":
        return cls(prompt=case["prompt"], subject=case["subject"], target_new=case["target_new"],
                   target_true=case.get("ground_truth"), case_id=case.get("case_id"))

    def template(self) -> str:
        """The prompt with the subject replaced by '{}' (its first occurrence)."""
        if not self.subject.strip():
            raise EditError("empty subject")
        if "{}" in self.prompt:
            return self.prompt
        if self.subject not in self.prompt:
            raise EditError(f"subject {self.subject!r} not in prompt {self.prompt!r}")
        return self.prompt.replace(self.subject, "{}", 1)

    def validate(self) -> None:
        self.template()
        if not self.target_new.strip():
            raise EditError("empty target_new")
        if self.target_true is not None and self.target_new.strip() == self.target_true.strip():
            raise EditError(f"target_new {self.target_new!r} equals the current answer")


@dataclass
class EditResult:
    """An applied edit: what changed, why, and how to take it back."""

    request: EditRequest
    editor: str
    saved: dict[str, torch.Tensor]  # parameter name -> clone of its value before the edit
    lm: LoadedModel = field(repr=False)
    diagnostics: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    test_prefix: str | None = None  # prompts are evaluated with this prefix (Fall of ROME, Sec. 5)
    undone: bool = False

    def undo(self) -> None:
        """Restore the saved tensors exactly (bit-identical)."""
        if self.undone:
            return
        with torch.no_grad():
            for name, value in self.saved.items():
                get_parameter(self.lm.model, name).copy_(value)
        self.undone = True


class Editor(Protocol):
    name: str

    def apply(self, lm: LoadedModel, request: EditRequest) -> EditResult: ...


def save_parameters(lm: LoadedModel, names: list[str]) -> dict[str, torch.Tensor]:
    """Clones of the named parameters: the undo handle, taken before any write."""
    return {n: get_parameter(lm.model, n).detach().clone() for n in names}


@contextmanager
def edited(lm: LoadedModel, request: EditRequest, editor: Editor):
    """`with edited(lm, request, ROME()) as result:` the model is edited inside, restored after."""
    result = editor.apply(lm, request)
    try:
        yield result
    finally:
        result.undo()
