"""Figures that more than one notebook draws.

- `sequential_ppl`: perplexity over an edit sequence, one panel per run, one line per editor, with the
  collapse threshold (Butterfly Effect, Sec. 4.2, its figure of perplexity over 107 edits).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .labels import COLLAPSE_THRESHOLD


def sequential_ppl(steps: pd.DataFrame, runs=("hard", "normal"), editors=None, title: str | None = None,
                   path=None, threshold: float = COLLAPSE_THRESHOLD):
    """ME-PPL over the steps of `steps` (`tables.sequential_rows`), one panel per run in `runs` (a run without
    steps: an empty panel), lines per editor in the order `editors`; saved to `path` where given. The figure."""
    runs = list(runs)
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), sharey=True, squeeze=False)
    size = f"$_{{{int(steps.ppl_size.iloc[0])}}}$" if len(steps) and "ppl_size" in steps else ""
    for ax, run in zip(axes.flat, runs):
        part = steps[steps.run == run] if len(steps) else steps
        if len(part):
            sns.lineplot(data=part, x="step", y="ppl", hue="editor", hue_order=editors, marker="o", ax=ax)
        ax.axhline(threshold, color="red", ls="--", lw=1)
        ax.set(yscale="log", title=f"{run} cases", xlabel="edits applied", ylabel=f"ME-PPL{size} perplexity")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig
