"""Token rows and positions shared by the editors, the key statistics and the metrics.

- `pad_ids`: token-id rows as one padded batch with its attention mask (right or left padding).
- `length_sorted_batches` / `token_budget_batches`: rows grouped by length, so that little is padding.
- `target_ids`: the continuation scored after a prompt, ``" " + target`` without specials (ROME).
- `subject_last_index`: where the key k is read, the subject's last token in ``template.format(subject)``.
  The subject must cover whole tokens: its first token starts where the prompt before it ends,
  and the prompt tokenizes the same with the subject in place as it does cut after the subject.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import EditError


def pad_ids(rows: list[list[int]], pad: int, left: bool = False, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as one padded batch (ids, attention mask); `left` puts the padding first."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cols = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, cols] = torch.tensor(r, dtype=torch.long)
            mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def length_sorted_batches(lengths, batch_size: int) -> list[np.ndarray]:
    """Indices grouped into batches of `batch_size` rows of similar length, longest first (OOM shows at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def token_budget_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length, shortest first, each batch as long as rows x its longest <= `batch_tokens`
    (a row longer than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, start = [], 0
    for k in range(1, len(order) + 1):
        if k == len(order) or (k - start + 1) * lengths[order[k]] > batch_tokens:
            batches.append(order[start:k])
            start = k
    return batches


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
