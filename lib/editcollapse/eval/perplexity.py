"""Perplexity on ME-PPL, the papers' surrogate for model collapse.

Per sentence d with tokens x_1..x_N (after the model's BOS rule), the predicted tokens are
x_2..x_N (n = N - 1), each scored by its log-probability given the tokens before it:

    ppl(d) = exp( -(1/n) * sum_{i=2..N} log p(x_i | x_<i) )

Without BOS (SmolLM2, GPT-2, GPT-J) the first text token is never predicted, so n is the
text length minus one; with BOS (Gemma, Llama-2) every text token is predicted. The corpus
figure is the MEAN of ppl(d) over the sentences (the median is reported too). This is the
definition of the authors' `compute_ppl` (easyeditor/editors/editor.py, the Hugging Face
`evaluate` perplexity), which produced the papers' ME-PPL numbers; their older
`easyeditor/util/perplexity.py` (divides by N, not n) is unused.

Collapse (Butterfly Effect paper, single-editing setup): ME-PPL_50 perplexity above 1,000.

Non-finite values: a sentence whose target gets probability 0, or whose mean NLL overflows
exp, has perplexity +inf (collapsed). When the model's logits contain NaN the perplexity is
undefined: the sentence's value is NaN, a warning says how many, and `is_collapsed` counts
NaN as collapsed (a model whose forward pass breaks down numerically is not working). No
exception is raised, so that a sweep over edits records the case instead of stopping on it.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import ME_PPL_FILES, load_me_ppl
from ..models.loading import LoadedModel

COLLAPSE_THRESHOLD = 1000.0


def length_sorted_batches(lengths, batch_size: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, longest first (less padding; OOM shows at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batch_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood of each row's predicted tokens (float64, shape (B,)).

    Targets are the next tokens where both positions are real (attention_mask 1); the
    last position and padding get ignore_index, so cross_entropy reads the logits in
    place (no shifted copy) and computes log-softmax in float32.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(**batch).logits
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return nll.view(ids.shape).double().sum(1) / (targets != -100).sum(1)


@torch.inference_mode()
def sentence_perplexities(lm: LoadedModel, texts: list[str], batch_size: int = 16,
                          progress: bool = True) -> np.ndarray:
    """ppl(d) of every text, in the input order (batched by length, right padding, masks)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must all be strings; {len(bad)} of {len(texts)} are not, the first is "
                         f"texts[{bad[0]}] = {texts[bad[0]]!r:.80} ({type(texts[bad[0]]).__name__})")
    lengths = [len(lm.token_ids(t)) for t in texts]
    short = [i for i, n in enumerate(lengths) if n < 2]
    if short:
        raise ValueError(f"texts {short[:10]} have fewer than 2 tokens (with the BOS rule): nothing to predict")
    if lengths:
        i = int(np.argmax(lengths))
        lm.check_fits(lengths[i], f"text {i}")
    out = np.empty(len(texts))
    batches = length_sorted_batches(lengths, batch_size)
    for idx in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        out[idx] = batch_nll(lm.model, lm.encode([texts[i] for i in idx])).cpu().numpy()
    with np.errstate(over="ignore"):
        out = np.exp(out)
    if np.isnan(out).any():
        warnings.warn(f"{int(np.isnan(out).sum())} of {len(out)} perplexities are NaN: the model's logits "
                      "contain NaN (counted as collapsed by is_collapsed)", RuntimeWarning, stacklevel=2)
    return out


def me_ppl(lm: LoadedModel, size: int = 50, batch_size: int = 16, progress: bool = True) -> dict:
    """ME-PPL perplexity: mean and median of ppl(d) over the ME-PPL_{size} sentences."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) not in ME_PPL_FILES:
        raise ValueError(f"size must be one of the ints {', '.join(map(str, ME_PPL_FILES))} (ME-PPL_50, ME-PPL_1k, "
                         f"the full ME-PPL), not {size!r} ({type(size).__name__})")
    ppl = sentence_perplexities(lm, load_me_ppl(int(size)), batch_size=batch_size, progress=progress)
    return dict(mean=float(np.mean(ppl)), median=float(np.median(ppl)), n=len(ppl))


def is_collapsed(ppl, threshold: float = COLLAPSE_THRESHOLD):
    """Collapse test of the papers: perplexity > threshold (inf and NaN count as collapsed)."""
    arr = np.asarray(ppl)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"is_collapsed needs a perplexity or an array of them (numbers), not {ppl!r:.80}")
    arr = arr.astype(float)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) or not threshold >= 1:
        raise ValueError(f"threshold must be a perplexity (a number >= 1), not {threshold!r}")
    if (arr < 1).any():
        raise ValueError(f"a perplexity is >= 1 (exp of a mean NLL >= 0); got {arr[arr < 1][:5]}")
    flags = np.isnan(arr) | (arr > threshold)
    return bool(flags) if flags.ndim == 0 else flags


def collapse_report(ppl_edited: float, ppl_original: float, threshold: float = COLLAPSE_THRESHOLD) -> dict:
    """Edited model's perplexity, its ratio to the unedited model's, and the collapse flag."""
    if not np.isfinite(ppl_original) or ppl_original < 1:
        raise ValueError(f"the unedited model's perplexity must be finite and >= 1, not {ppl_original}")
    return dict(ppl=float(ppl_edited), ratio=float(ppl_edited) / float(ppl_original),
                collapsed=is_collapsed(ppl_edited, threshold))
