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

Collapse (Butterfly Effect paper, single-editing setup): ME-PPL_50 perplexity above 1,000
(`results.labels.is_collapsed`).

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

from ..data import ME_PPL_FILES, load_me_ppl
from ..models.loading import LoadedModel
from .scoring import continuation_logprobs


@torch.inference_mode()
def sentence_perplexities(lm: LoadedModel, texts: list[str], batch_size: int = 16,
                          progress: bool = True) -> np.ndarray:
    """ppl(d) of every text, in the input order: `scoring.continuation_logprobs` of x_2..x_N after x_1
    (batched by length), the NLL summed in float64."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must all be strings; {len(bad)} of {len(texts)} are not, the first is "
                         f"texts[{bad[0]}] = {texts[bad[0]]!r:.80} ({type(texts[bad[0]]).__name__})")
    rows = [lm.token_ids(t) for t in texts]
    lengths = [len(r) for r in rows]
    short = [i for i, n in enumerate(lengths) if n < 2]
    if short:
        raise ValueError(f"texts {short[:10]} have fewer than 2 tokens (with the BOS rule): nothing to predict")
    if lengths:
        i = int(np.argmax(lengths))
        lm.check_fits(lengths[i], f"text {i}")
    scored = continuation_logprobs(lm, [(r[:1], r[1:]) for r in rows], batch_size, progress, desc="perplexity")
    out = np.array([-logp.double().sum().item() / len(logp) for logp, _ in scored])
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
