"""Statistics behind the pilot observation (Yang et al., ACL 2024 Findings, Sec. 2-3): downstream
scores of the original model, of normal edits and of collapsed edits, with bootstrap confidence
intervals over items, and the rank correlation between log-perplexity and score.

Inputs are the tidy downstream rows of `experiments.single.downstream_rows` (task, metric, value, n, items,
case_id, ...) with each model's ME-PPL perplexity in a `ppl` column. Every model of one task saw the
same items (a seeded sample), so `items` lists line up across models.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..eval.downstream import HEADLINE, RANDOM_BASELINE
from ..results.labels import COLLAPSE_THRESHOLD, is_collapsed

GROUPS = ("original", "normal", "collapsed")


def status(case_id: int, ppl: float, threshold: float = COLLAPSE_THRESHOLD) -> str:
    """'original' for the unedited model (case_id -1), else 'collapsed' when perplexity > threshold, else 'normal'."""
    if case_id == -1:
        return "original"
    return "collapsed" if is_collapsed(ppl, threshold) else "normal"


def pick_edits(sweep: pd.DataFrame, n: int, seed: int = 0, threshold: float = COLLAPSE_THRESHOLD) -> pd.DataFrame:
    """The edits of a single-edit sweep (rows with case_id, ppl) to evaluate downstream: the `n` collapsed
    ones with the highest perplexity (the paper's choice) and a seeded random `n` of the normal ones
    (not the best ones, which would flatter the normal group); column `group`, sorted by perplexity."""
    groups = np.array([status(int(c), float(p), threshold) for c, p in zip(sweep.case_id, sweep.ppl)])
    collapsed = sweep[groups == "collapsed"].nlargest(n, "ppl")
    normal = sweep[groups == "normal"]
    normal = normal.sample(n=min(n, len(normal)), random_state=seed) if len(normal) else normal
    picked = pd.concat([collapsed.assign(group="collapsed"), normal.assign(group="normal")])
    return picked.sort_values("ppl").reset_index(drop=True)


def headline_rows(rows: pd.DataFrame, headline: dict[str, str] = HEADLINE,
                  threshold: float = COLLAPSE_THRESHOLD) -> pd.DataFrame:
    """The rows of each task's headline metric, with `group` (original / normal / collapsed) and log10_ppl."""
    picked = rows[[headline.get(t) == m for t, m in zip(rows.task, rows.metric)]].copy()
    picked["group"] = [status(int(c), float(p), threshold) for c, p in zip(picked.case_id, picked.ppl)]
    picked["log10_ppl"] = np.log10(picked.ppl.astype(float))
    return picked.reset_index(drop=True)


def _statistic(metric: str):
    """Per-item scores -> the task's score: the mean, or exp(-mean log-likelihood) for a perplexity."""
    if metric == "perplexity":
        return lambda x: np.exp(-x.mean(axis=-1))
    return lambda x: x.mean(axis=-1)


def group_score(items: list[list[float]], metric: str, n_boot: int = 2000, level: float = 0.95,
                seed: int = 0) -> dict:
    """Score of a group of models (their mean score) and its percentile-bootstrap interval.

    `items[m][i]` is model m's score on item i (the same items for every model). Each bootstrap
    replicate draws the models with replacement and, independently, the items with replacement (the
    same items for all models), so the interval covers both the choice of items and of edits.
    """
    x = np.asarray(items, dtype=float)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"items must be models x items scores, got shape {x.shape}")
    stat = _statistic(metric)
    rng = np.random.default_rng(seed)
    models = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    picks = rng.integers(0, x.shape[1], size=(n_boot, x.shape[1]))
    boot = np.array([stat(x[m][:, i]).mean() for m, i in zip(models, picks)])
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return dict(value=float(stat(x).mean()), lo=float(lo), hi=float(hi), n_models=x.shape[0], n_items=x.shape[1])


def group_table(picked: pd.DataFrame, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per (task, group): score, bootstrap interval, models, items, and the task's chance level."""
    out = []
    for (task, metric, group), g in picked.groupby(["task", "metric", "group"], sort=False):
        lengths = {len(i) for i in g["items"]}
        if len(lengths) != 1:
            raise ValueError(f"{task}: the models of group {group} were scored on different numbers of items {lengths}")
        out.append(dict(task=task, metric=metric, group=group, **group_score(list(g["items"]), metric, n_boot,
                                                                            level, seed),
                        chance=RANDOM_BASELINE.get(task, np.nan)))
    table = pd.DataFrame(out)
    if table.empty:
        return table
    table["group"] = pd.Categorical(table.group, categories=GROUPS, ordered=True)
    return table.sort_values(["task", "group"]).reset_index(drop=True)


def difference(picked: pd.DataFrame, task: str, a: str = "normal", b: str = "collapsed", n_boot: int = 2000,
               level: float = 0.95, seed: int = 0) -> dict:
    """Score of group `a` minus group `b` on `task` with a bootstrap interval (models and items resampled
    as in `group_score`; the items drawn are shared by both groups, which saw the same items)."""
    g = picked[picked.task == task]
    xa = np.asarray(list(g[g.group == a]["items"]), dtype=float)
    xb = np.asarray(list(g[g.group == b]["items"]), dtype=float)
    if xa.size == 0 or xb.size == 0:
        raise ValueError(f"{task}: need models in both groups {a!r} and {b!r}")
    stat = _statistic(g.metric.iloc[0])
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        i = rng.integers(0, xa.shape[1], size=xa.shape[1])
        ma, mb = rng.integers(0, len(xa), size=len(xa)), rng.integers(0, len(xb), size=len(xb))
        boot.append(stat(xa[ma][:, i]).mean() - stat(xb[mb][:, i]).mean())
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return dict(task=task, difference=float(stat(xa).mean() - stat(xb).mean()), lo=float(lo), hi=float(hi),
                n_a=len(xa), n_b=len(xb), n_items=xa.shape[1])


def correlation(picked: pd.DataFrame, min_models: int = 5) -> pd.DataFrame:
    """Spearman correlation of log-perplexity and score per task, over the models evaluated, with n.

    Reported only where it is defined and meaningful: at least `min_models` models, and neither
    perplexity nor score constant across them (a task where every model sits at the same score, e.g.
    at chance, has no rank correlation); otherwise rho and p are NaN and `note` says why.
    """
    from scipy.stats import spearmanr

    out = []
    for task, g in picked.groupby("task", sort=False):
        row = dict(task=task, metric=g.metric.iloc[0], n=len(g), rho=np.nan, p=np.nan, note="")
        if len(g) < min_models:
            row["note"] = f"fewer than {min_models} models"
        elif g.value.nunique() < 2:
            row["note"] = f"every model scores {g.value.iloc[0]:.3g}"
        elif g.log10_ppl.nunique() < 2:
            row["note"] = "constant perplexity"
        else:
            res = spearmanr(g.log10_ppl, g.value)
            row.update(rho=float(res.statistic), p=float(res.pvalue))
        out.append(row)
    return pd.DataFrame(out, columns=["task", "metric", "n", "rho", "p", "note"])
