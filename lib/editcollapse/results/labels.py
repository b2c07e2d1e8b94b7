"""The collapse rule (Yang et al., ACL 2024 Findings, Sec. 3): an edit collapses the model when its ME-PPL
perplexity exceeds a threshold (1000 in the papers; inf and NaN count as collapsed). Where the unedited
perplexity is known it must also at least double, so that a model that starts above the threshold is not
called collapsed by an edit that leaves it as it was."""
from __future__ import annotations

import numbers

import numpy as np
import pandas as pd

COLLAPSE_THRESHOLD = 1000.0
MIN_RATIO = 2.0  # edited / unedited perplexity, where the unedited one is known


def is_collapsed(ppl, threshold: float = COLLAPSE_THRESHOLD, ppl_original=None):
    """ppl > threshold (NaN and inf count), and ppl > MIN_RATIO × ppl_original where that is given (a number or an
    array like ppl; NaN: unknown). A bool for a number, a bool array for an array or Series."""
    arr = np.asarray(ppl)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"is_collapsed needs a perplexity or an array of them (numbers), not {ppl!r:.80}")
    arr = arr.astype(float)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 1:
        raise ValueError(f"threshold must be a perplexity (a number >= 1), not {threshold!r}")
    if (arr < 1).any():
        raise ValueError(f"a perplexity is >= 1 (exp of a mean NLL >= 0); got {arr[arr < 1][:5]}")
    flags = np.isnan(arr) | (arr > threshold)
    if ppl_original is not None:
        base = np.asarray(ppl_original, dtype=float)
        flags &= ~(arr <= MIN_RATIO * base)  # NaN base (unknown): no ratio condition
    if isinstance(ppl, pd.Series):
        return pd.Series(flags, index=ppl.index)
    return bool(flags) if flags.ndim == 0 else flags


def collapse_report(ppl_edited: float, ppl_original: float, threshold: float = COLLAPSE_THRESHOLD) -> dict:
    """Edited model's perplexity, its ratio to the unedited model's, and the collapse flag."""
    if not np.isfinite(ppl_original) or ppl_original < 1:
        raise ValueError(f"the unedited model's perplexity must be finite and >= 1, not {ppl_original}")
    return dict(ppl=float(ppl_edited), ratio=float(ppl_edited) / float(ppl_original),
                collapsed=is_collapsed(ppl_edited, threshold))
