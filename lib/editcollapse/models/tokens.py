"""Token positions shared by the editors, the key statistics and the metrics.

- `target_ids`: the continuation scored after a prompt, ``" " + target`` without specials (ROME).
- `subject_last_index`: where the key k is read, the subject's last token in ``template.format(subject)``.
  The subject must cover whole tokens: its first token starts where the prompt before it ends,
  and the prompt tokenizes the same with the subject in place as it does cut after the subject.
"""
from __future__ import annotations

from ..errors import EditError


def target_ids(lm, target: str) -> list[int]:
    """Token ids of ``" " + target`` without BOS or other specials (the continuation scored)."""
    if not isinstance(target, str):
        raise EditError(f"target must be a string, not {type(target).__name__} {target!r:.80}")
    if not target.strip():
        raise EditError(f"target must be a non-empty string, got {target!r}")
    return lm.tok(" " + target, add_special_tokens=False)["input_ids"]


def subject_last_index(lm, template: str, subject: str) -> int:
    """Index of the subject's last token in `template.format(subject)` (BOS counted).

    Raises EditError when the subject does not start or end on a token boundary there.
    """
    prefix = template[: template.index("{}")]
    text = template.format(subject)
    full = lm.token_ids(text)
    # a space before the subject belongs to its first token (" Paris"), so compare without it
    before = lm.token_ids(prefix[:-1] if prefix.endswith(" ") else prefix)
    upto = lm.token_ids(prefix + subject)
    if full[: len(before)] != before or len(upto) <= len(before):
        raise EditError(f"subject {subject!r} does not start on a token boundary in {text!r}")
    if full[: len(upto)] != upto:
        raise EditError(f"subject {subject!r} tokenizes differently inside {text!r}")
    return len(upto) - 1
