"""Teacher-forced scoring, the one primitive under the edit metrics, the perplexity and the FT / MEND losses.

A pair is (prompt ids p_1..p_P, continuation ids c_1..c_T), P >= 1. Its row is fed right-padded
with an attention mask (under the causal mask padding never reaches a scored position), and
position P-1+j scores c_j:

    log p(c_j | p, c_<j) = log_softmax(logits[P-1+j])[c_j]        (float32)

The row (`pack`'s `inputs`) is the whole text p ⊕ c ("text": the metrics and the perplexity),
the tokens teacher forcing needs p ⊕ c_<T ("forced": the FT and MEND losses), or the bare prompt
with every c_j scored at its last position P-1 ("prompt": FT's prompt_last). The batch width sets
the float32 rounding of the logits, so each caller keeps the rows it has always fed. Batches go longest
first: with more than `batch_size` pairs they group other rows than an input-order batching (values
move by up to 1e-6; the edit metrics score at most 6 pairs, one batch).

- `target_pairs`: (prompt, ``" " + target``) pairs as ROME scores them (prompt with the BOS rule);
- `pack` lays pairs out as one batch; `token_logprobs` / `mean_nll` read the scored log-probs from
  logits (differentiable: the FT and MEND losses train on them);
- `continuation_logprobs` runs the live model over pairs in length-sorted batches (the metrics, and
  the perplexity with a one-token prompt).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import EditError
from ..models.tokens import length_sorted_batches, pad_ids, target_ids

INPUTS = ("text", "forced", "prompt")


@dataclass
class Packed:
    """Pairs as one right-padded batch: continuation token k is scored at (rows[k], cols[k])."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    tokens: torch.Tensor
    n_pairs: int


def target_pairs(lm, prompts: list[str], targets: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids with the BOS rule, ids of ``" " + target``) per pair; EditError for a prompt without tokens."""
    if isinstance(prompts, str) or isinstance(targets, str):
        raise TypeError("prompts and targets must be lists of strings, not one string")
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValueError("no prompts: give at least one (prompt, target) pair")
    pairs = []
    for prompt, target in zip(prompts, targets):
        p = lm.token_ids(prompt)
        if not p:
            raise EditError(f"prompt {prompt!r} has no tokens; the first target token needs a context "
                            f"(model {lm.spec.name} adds no BOS)")
        pairs.append((p, target_ids(lm, target)))
    return pairs


def pack(lm, pairs: list[tuple[list[int], list[int]]], inputs: str = "forced",
         extra_rows: list[list[int]] = ()) -> Packed:
    """The pairs' rows ("text": p ⊕ c, "forced": p ⊕ c_<T, "prompt": p) on the model's device, then the
    unscored `extra_rows` (token ids)."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, not {inputs!r}")
    seqs, rows, cols, tokens = [], [], [], []
    for i, (p, c) in enumerate(pairs):
        if not p or not c:
            raise ValueError(f"pair {i} has {len(p)} prompt and {len(c)} continuation tokens; both need one")
        seqs.append({"text": p + c, "forced": p + c[:-1], "prompt": p}[inputs])
        cols += [len(p) - 1] * len(c) if inputs == "prompt" else list(range(len(p) - 1, len(p) - 1 + len(c)))
        rows += [i] * len(c)
        tokens += c
    pad = lm.tok.pad_token_id if lm.tok.pad_token_id is not None else 0
    ids, mask = pad_ids(seqs + list(extra_rows), pad, left=False, device=lm.device)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=lm.device)  # noqa: E731
    return Packed(ids, mask, as_long(rows), as_long(cols), as_long(tokens), len(seqs))


def token_logprobs(logits: torch.Tensor, b: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(c_j | ·) [n_tokens], argmax ids [n_tokens]) from the logits at the scored positions
    [n_tokens, V] (in b.rows, b.cols order), log-softmax in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp[torch.arange(len(b.tokens), device=logp.device), b.tokens], logp.argmax(-1)


def mean_nll(logits: torch.Tensor, b: Packed) -> torch.Tensor:
    """-1/T Σ_j log p(c_j | p, c_<j) per pair [n_pairs] (float32), from the logits at the scored positions."""
    nll = -token_logprobs(logits, b)[0]
    total = torch.zeros(b.n_pairs, device=nll.device).index_add(0, b.rows, nll)
    count = torch.zeros(b.n_pairs, device=nll.device).index_add(0, b.rows, torch.ones_like(nll))
    return total / count


def continuation_logprobs(lm, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16,
                          progress: bool = False, desc: str = "scoring") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair, on the CPU: (log p(c_j | p, c_<j) for j = 1..T, the argmax token at each of those positions).

    The whole texts p ⊕ c run in batches of `batch_size`, longest first; gradients flow unless the
    caller turns them off.
    """
    out = [None] * len(pairs)
    batches = length_sorted_batches([len(p) + len(c) for p, c in pairs], batch_size)
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        b = pack(lm, [pairs[i] for i in idx], inputs="text")
        logits = lm.model(input_ids=b.ids, attention_mask=b.mask).logits
        logp, pred = (x.cpu() for x in token_logprobs(logits[b.rows, b.cols], b))
        sizes = [len(pairs[i][1]) for i in idx]
        for i, lp, pr in zip(idx, logp.split(sizes), pred.split(sizes)):
            out[i] = (lp, pr)
    return out
