"""An edit request: rewrite (subject, relation) -> target_new, checked field by field."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import EditError


def _text(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str):
        raise EditError(f"{name} must be a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise EditError(f"empty {name} {value!r}")


def same_answer(a: str, b: str) -> bool:
    """Whether two answers are the same fact: equal after stripping spaces and case-folding ('rome' is ' Rome')."""
    return a.strip().casefold() == b.strip().casefold()


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
        """From a CounterFact / zsRE case of `data.py` (prompt, subject, target_new, ground_truth, case_id)."""
        if not isinstance(case, dict):
            raise EditError(f"a case must be a dict, got {type(case).__name__}")
        missing = [k for k in ("prompt", "subject", "target_new") if k not in case]
        if missing:
            raise EditError(f"case {case.get('case_id')!r} lacks {', '.join(missing)}")
        return cls(prompt=case["prompt"], subject=case["subject"], target_new=case["target_new"],
                   target_true=case.get("ground_truth"), case_id=case.get("case_id"))

    def template(self) -> str:
        """The prompt with the subject replaced by '{}' (its first occurrence, on word boundaries)."""
        _text("prompt", self.prompt)
        _text("subject", self.subject)
        if "{" in self.subject or "}" in self.subject:
            raise EditError(f"subject {self.subject!r} holds a brace; braces are kept for the prompt's '{{}}', "
                            f"which marks the subject's place")
        if "{}" in self.prompt:
            tmpl = self.prompt
        else:
            at = self.prompt.find(self.subject)
            if at < 0:
                raise EditError(f"subject {self.subject!r} not in prompt {self.prompt!r}")
            end = at + len(self.subject)
            inside = (at > 0 and self.prompt[at - 1].isalnum() and self.subject[0].isalnum()) or \
                     (end < len(self.prompt) and self.prompt[end].isalnum() and self.subject[-1].isalnum())
            if inside:
                raise EditError(f"subject {self.subject!r} is only part of a word in prompt {self.prompt!r}")
            tmpl = self.prompt[:at] + "{}" + self.prompt[end:]
        if tmpl.count("{}") != 1 or tmpl.replace("{}", "").count("{") or tmpl.replace("{}", "").count("}"):
            raise EditError(f"prompt {self.prompt!r} may hold '{{}}' once and no other braces")
        return tmpl

    def validate(self) -> None:
        """Raise EditError naming the field when the request cannot be applied."""
        self.template()
        _text("target_new", self.target_new)
        _text("target_true", self.target_true, optional=True)
        if self.case_id is not None and (isinstance(self.case_id, bool) or not isinstance(self.case_id, int)):
            raise EditError(f"case_id must be an int or None, got {self.case_id!r}")
        if self.target_true is not None and same_answer(self.target_new, self.target_true):
            raise EditError(f"target_new {self.target_new!r} equals the current answer {self.target_true!r} "
                            f"(compared without case and surrounding spaces)")
