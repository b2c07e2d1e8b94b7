"""Notebook 04's figures ("The Fall of ROME", Sec. 3-5); each is saved under `figures_dir()` as 04_<name>_<model>.png."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..paths import figures_dir
from ..results.labels import COLLAPSE_THRESHOLD
from .crome import IDENTITY, CaseKeys


def _save(fig, name: str, model: str):
    fig.tight_layout()
    fig.savefig(figures_dir() / f"04_{name}_{model}.png", dpi=150)
    return fig


def keys(ck: CaseKeys, model: str, layer: int, seed: int = 0):
    """PCA and t-SNE of unit k^u, k̄, C⁻¹k̄ (and k^u behind a prefix) of collapse and normal cases."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, method in zip(axes, ("pca", "tsne")):
        sns.scatterplot(data=ck.points(method, seed), x="x", y="y", hue="kind", style="case", size="first_token",
                        sizes={True: 90, False: 30}, ax=ax, alpha=0.8)
        ax.set(title=f"{method.upper()} of unit keys ({model}, layer {layer})", xlabel="", ylabel="")
    return _save(fig, "keys_pca_tsne", model)


def first_position_keys(pts: pd.DataFrame, model: str, layer: int):
    """PCA of keys of ordinary text: at the first token against later ones."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sns.scatterplot(data=pts, x="x", y="y", hue="where", style="where", ax=ax)
    ax.set(title=f"Keys of ordinary text at layer {layer}: first token vs later ones ({model})", xlabel="PC 1",
           ylabel="PC 2")
    return _save(fig, "first_position_keys", model)


def position_norms(prof: pd.DataFrame, model: str):
    """Relative hidden-state and key norms per position (`crome.relative_norms`), per model."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, col, what in zip(axes, ("hidden_rel", "key_rel"), ("hidden state (layer output)", "key (MLP-out input)")):
        sns.lineplot(data=prof[prof.position < 16], x="position", y=col, hue="model", marker="o", ax=ax,
                     errorbar=None)
        ax.set(yscale="log", ylabel=f"‖{what}‖ / median at positions ≥ 2", xlabel="position (−1: BOS)",
               title="Norms at the edited layer per position")
    return _save(fig, "position_norms", model)


def denominators(stored: pd.DataFrame, model: str):
    """Denominator, ‖numerator‖ and ‖Δ‖ of the stored ROME edits, collapse against normal, without and with C."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, col in zip(axes, ("denominator", "numerator_norm", "delta_norm")):
        sns.stripplot(data=stored, x="mom2", y=col, hue="case", dodge=True, ax=ax, alpha=0.7)
        ax.set(yscale="log", xlabel="mom2_adjustment", title=col)
    return _save(fig, "denominators", model)


def c_gathering(dens: pd.DataFrame, c_rows: pd.DataFrame, model: str, c_tokens, original: float, ppl_size: int):
    """ROME's denominator under each C (`keyspace.denominators_under`, C = I left out) and, where edited, ME-PPL
    after ROME under each C (`crome.c_gathering`)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.stripplot(data=dens[dens.variant != IDENTITY], x="variant", y="denominator", hue="case", ax=ax, dodge=True)
    ax.set(yscale="log", xlabel="", title=f"ROME's denominator under each C ({model}, {c_tokens or 'all'} keys)")
    ax.tick_params(axis="x", rotation=30)
    _save(fig, "c_gathering_denominators", model)
    if len(c_rows):
        fig, ax = plt.subplots(figsize=(7, 4))
        sns.barplot(data=c_rows, x="variant", y="ppl", hue="case", ax=ax)
        ax.axhline(COLLAPSE_THRESHOLD, color="red", ls="--", lw=1)
        ax.axhline(original, color="gray", ls=":", lw=1)
        ax.set(yscale="log", xlabel="", ylabel=f"ME-PPL$_{{{ppl_size}}}$ after the edit", title="ROME under each C")
        ax.tick_params(axis="x", rotation=30)
        _save(fig, "c_gathering_ppl", model)


def screen_scores(screened: pd.DataFrame, threshold: float, model: str):
    """The guard's scores of the CounterFact screen, with its threshold."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(screened.score.replace([np.inf, -np.inf], np.nan).dropna(), bins=80, log=True, color="gray")
    ax.axvline(threshold, color="red", ls="--", label=f"threshold (uᵀk^u {np.exp(-threshold):.3g})")
    ax.set(xlabel="guard score −log(uᵀk^u)", ylabel="CounterFact cases",
           title=f"Screen of {len(screened):,} CounterFact cases on {model}")
    ax.legend()
    return _save(fig, "screen_scores", model)
