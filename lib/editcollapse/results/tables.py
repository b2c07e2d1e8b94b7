"""Summaries over result rows that more than one notebook needs.

- `sweep_rows` / `sequential_rows`: the rows of one sweep or of sequential runs (through `query.select`).
- `label_cases`: "collapse" / "normal" per row, and the label the same case got under a reference
  editor (ROME), so that C-ROME and the others can be compared on ROME's collapse cases.
- `single_edit_table`: the Butterfly-Effect single-editing comparison, one row per (editor,
  dataset): edits, refusals, collapse rate, perplexity, efficacy, generalisation, locality and the
  relative parameter change that every editor reports, each rate and mean with its 95 % interval
  (`wilson_interval`, `mean_interval`).
- `bos_contrast_table` / `bos_contrast_summary`: the papers' contrast of a model without BOS and one
  with it (first-token cases against random ones), as a table and a sentence.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd

from .labels import COLLAPSE_THRESHOLD, is_collapsed
from .query import select

HEADLINE = ("efficacy", "generalization", "locality")


def sweep_rows(rows, experiment: str, model: str, editors, cases: dict[str, list[dict]]) -> pd.DataFrame:
    """Rows of `experiment` on `model` by `editors` for the sampled `cases` ({dataset: [case, ...]})."""
    return select(rows, cases=cases, experiment=experiment, model=model, editor=list(editors))


def label_cases(rows: pd.DataFrame, reference: str = "rome") -> pd.DataFrame:
    """Adds `case` (collapse / normal, by the row's own `collapsed`) and `reference_case`: the label of the
    same (dataset, case_id) under the `reference` editor ("n/a" where it has no successful row)."""
    out = rows.copy()
    ok = out.error.isna() if "error" in out else pd.Series(True, index=out.index)
    out["case"] = (out.collapsed.fillna(False).astype(bool).map({True: "collapse", False: "normal"})
                   .where(ok, "refused"))
    ref = out[(out.editor == reference) & ok].set_index(["dataset", "case_id"]).case
    ref = ref[~ref.index.duplicated()]  # a case in two samples has two identical rows
    out["reference_case"] = [ref.get((d, c), "n/a") for d, c in zip(out.dataset, out.case_id)]
    return out


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (scipy's `binomtest(...).proportion_ci`; NaN, NaN for n = 0).
    Unlike k/n ± z·se it stays in [0, 1] and is not empty at k = 0 or k = n: 0 of 10 gives (0, 0.278),
    5 of 10 (0.237, 0.763)."""
    from scipy.stats import binomtest

    if n <= 0:
        return math.nan, math.nan
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def mean_interval(values, level: float = 0.95, bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """Student-t interval of the mean of `values` (NaN dropped): mean ± t_{n-1}·s/√n, the mean itself where s = 0
    (scipy's `t.interval` gives NaN there); NaN, NaN below 2 values. With `bounds`, clipped to them (a metric's
    range). [0, 1, 1, 1]: 0.75 ± 3.182·0.25."""
    from scipy.stats import t

    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return math.nan, math.nan
    half = float(t.ppf((1 + level) / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    lo, hi = float(x.mean()) - half, float(x.mean()) + half
    return (max(bounds[0], lo), min(bounds[1], hi)) if bounds else (lo, hi)


def single_edit_table(rows: pd.DataFrame, threshold: float = COLLAPSE_THRESHOLD, by=("editor", "dataset"),
                      level: float = 0.95, metrics=HEADLINE) -> pd.DataFrame:
    """Per (editor, dataset) (or the columns `by`, e.g. ("editor", "sample")): edits, refused, collapsed,
    collapse_rate with its Wilson interval (`collapse_rate_lo`, `collapse_rate_hi`; `wilson_interval`), ppl
    (max, median), the headline metrics (or `metrics`; mean over successful edits) each with a Student-t interval over the
    edits, clipped to [0, 1], the metrics' range (`<metric>_lo`, `<metric>_hi`; `mean_interval`), and the
    median relative parameter change ‖ΔW‖/‖W‖. Intervals are at `level` (95 %).

    Edits of cases the editor was trained on (MEND's training split, column `trained_on`) are left
    out, so that every score is a held-out score; `trained_on_left_out` counts them."""
    by = list(by)
    seen = rows.trained_on.fillna(False).astype(bool) if "trained_on" in rows else pd.Series(False, index=rows.index)
    left_out = seen.groupby([rows[c] for c in by]).sum().astype(int)
    rows = rows[~seen]
    ok = rows[rows.error.isna()] if "error" in rows else rows
    refused = (rows.groupby(by).error.apply(lambda e: int(e.notna().sum())) if "error" in rows else 0)
    metrics = [m for m in metrics if m in ok]
    table = ok.groupby(by).agg(
        edits=("case_id", "size"), collapsed=("ppl", lambda p: int(is_collapsed(p, threshold).sum())),
        max_ppl=("ppl", "max"), median_ppl=("ppl", "median"),
        **{m: (m, "mean") for m in metrics},
        median_rel_change=("rel_change", "median"), seconds_edit=("seconds_edit", "median"))
    table.insert(1, "refused", refused)
    table["trained_on_left_out"] = left_out.reindex(table.index, fill_value=0)
    table.insert(3, "collapse_rate", table.collapsed / table.edits)
    wilson = [wilson_interval(k, n, level) for k, n in zip(table.collapsed, table.edits)]
    table.insert(4, "collapse_rate_lo", [w[0] for w in wilson])
    table.insert(5, "collapse_rate_hi", [w[1] for w in wilson])
    groups = ok.groupby(by)
    for m in metrics:
        spans = groups[m].apply(lambda v: mean_interval(v, level, bounds=(0.0, 1.0))).reindex(table.index)
        at = table.columns.get_loc(m) + 1
        table.insert(at, f"{m}_lo", [s[0] for s in spans])
        table.insert(at + 1, f"{m}_hi", [s[1] for s in spans])
    return table


def single_edit_lines(table: pd.DataFrame, ppl_size: int = 50) -> list[str]:
    """One line per row of `single_edit_table`: k of n edits collapse (rate, 95 % Wilson interval), the largest
    and median ME-PPL, and each headline metric with its 95 % interval."""
    lines = []
    for key, r in table.iterrows():
        editor, where = (key[0], " / ".join(map(str, key[1:]))) if isinstance(key, tuple) else (key, "")
        scores = ", ".join(f"{m} {r[m]:.2f} [{r[f'{m}_lo']:.2f}, {r[f'{m}_hi']:.2f}]" for m in HEADLINE
                           if m in r and r[m] == r[m])
        lines.append(f"{editor:>9} on {where:<11}: {int(r.collapsed)} of {int(r.edits)} edits collapse the model "
                     f"({r.collapse_rate:.1%}, 95 % CI {r.collapse_rate_lo:.1%}–{r.collapse_rate_hi:.1%}; largest "
                     f"ME-PPL_{ppl_size} {r.max_ppl:,.1f}, median {r.median_ppl:,.1f}); {scores}")
    return lines


def bos_contrast_table(rows: pd.DataFrame, bos: dict[str, bool], threshold: float = COLLAPSE_THRESHOLD,
                       level: float = 0.95) -> pd.DataFrame:
    """The papers' contrast: per (model, editor, sample) the collapse rate with its Wilson interval, and
    whether the model puts a BOS token in front (`bos`: {model: prepend_bos}). `rows` are single-edit rows
    with a `sample` column (e.g. "first-token", "random")."""
    table = single_edit_table(rows, threshold, by=("model", "editor", "sample"), level=level)
    table = table[["edits", "refused", "collapsed", "collapse_rate", "collapse_rate_lo", "collapse_rate_hi",
                   "max_ppl", "median_ppl"]].copy()
    table.insert(0, "bos", [bool(bos.get(m)) for m in table.index.get_level_values("model")])
    return table


def bos_contrast_summary(table: pd.DataFrame, sample: str = "first-token") -> str:
    """One sentence per (model, editor) on the `sample` cases: k of n collapse (rate, 95 % interval), model
    with or without BOS; then whether the models with BOS collapse less than those without."""
    if table.empty:
        return "no contrast rows"
    parts, rates = [], {True: [], False: []}
    for (model, editor, s), r in table.iterrows():
        if s != sample:
            continue
        parts.append(f"{editor} on {model} ({'BOS' if r.bos else 'no BOS'}): {int(r.collapsed)} of {int(r.edits)} "
                     f"{sample} edits collapse ({r.collapse_rate:.0%}, 95 % CI {r.collapse_rate_lo:.0%}–"
                     f"{r.collapse_rate_hi:.0%})")
        rates[bool(r.bos)].append(r)
    text = "; ".join(parts) + "." if parts else f"no {sample} edits in the contrast."
    if rates[True] and rates[False]:
        worst_bos = max(rates[True], key=lambda r: r.collapse_rate_hi)
        best_nobos = min(rates[False], key=lambda r: r.collapse_rate_lo)
        apart = worst_bos.collapse_rate_hi < best_nobos.collapse_rate_lo
        text += (" The papers' contrast " + ("holds: every" if apart else "is not separated here: not every")
                 + " 95 % interval with BOS lies below every one without.")
    return text


def sequential_rows(rows, model: str, editors, runs, experiment: str = "sequential",
                    ppl_size: int | None = None) -> pd.DataFrame:
    """The steps of the sequential runs `runs` of `editors` on `model` (measured on ME-PPL_<ppl_size>, where
    given), sorted by editor, run and step."""
    where = dict(experiment=experiment, model=model, editor=list(editors), run=list(runs))
    if ppl_size is not None:
        where["ppl_size"] = ppl_size
    return select(rows, sort=["editor", "run", "step"], **where)


def collapse_steps(rows: pd.DataFrame, threshold: float = COLLAPSE_THRESHOLD) -> pd.DataFrame:
    """Per (editor, run): steps, the first collapsed step (`labels.is_collapsed`; NaN: never),
    perplexity before and after the last step, and the largest relative change of a touched tensor."""
    def one(g):
        over = g[is_collapsed(g.ppl, threshold)]
        return pd.Series(dict(steps=int(g.step.max()), first_collapse_step=over.step.min() if len(over) else float("nan"),
                              ppl_start=g.ppl[g.step == 0].iloc[0] if (g.step == 0).any() else float("nan"),
                              ppl_end=g.ppl[g.step == g.step.max()].iloc[0], ppl_max=g.ppl.max(),
                              refused=int(g.error.notna().sum()) if "error" in g else 0,
                              cum_rel_change_end=g.cum_rel_change[g.step == g.step.max()].iloc[0],
                              norm_growth_end=g.norm_growth[g.step == g.step.max()].iloc[0],
                              cond_ratio_end=g.cond_ratio[g.step == g.step.max()].iloc[0]))
    return rows.groupby(["editor", "run"])[list(rows.columns)].apply(one)


def checkpoint_table(rows: pd.DataFrame, size: int = 1000) -> pd.DataFrame:
    """Perplexity on ME-PPL_<size> at the steps where the runs measured it: one row per (editor, run), one
    column per step (the sequential rows' ppl_<size>); empty when no row holds it."""
    column = f"ppl_{size}"
    if column not in rows or rows[column].isna().all():
        return pd.DataFrame()
    return rows.dropna(subset=[column]).pivot_table(index=["editor", "run"], columns="step", values=column)


def downstream_table(downstream: pd.DataFrame, steps: pd.DataFrame, original: pd.DataFrame | None = None,
                     ppl_original: float | None = None) -> pd.DataFrame:
    """The paper's table: one row per (cases, editor) at its last step with downstream scores, with
    the original model on top (`original`: its task, metric, value rows); columns: perplexity at
    that step, then each task's metrics."""
    if downstream.empty:
        return pd.DataFrame()
    d = downstream.assign(column=downstream.task + " " + downstream.metric)
    d = d[d.step == d.groupby(["run", "editor"]).step.transform("max")]
    table = d.pivot_table(index=["run", "editor"], columns="column", values="value", aggfunc="first")
    at = d.groupby(["run", "editor"]).step.max()
    ppl = steps.set_index(["run", "editor", "step"]).ppl
    table.insert(0, "perplexity", [ppl.get((r, e, at[(r, e)]), float("nan")) for r, e in table.index])
    if original is not None:
        top = original.assign(column=original.task + " " + original.metric).set_index("column").value
        first = pd.DataFrame([dict(perplexity=ppl_original, **top)], index=pd.MultiIndex.from_tuples([("original", "")]))
        table = pd.concat([first, table])
    table.index.names = ["cases", "editor"]
    return table


def downstream_change(downstream: pd.DataFrame, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Each run's downstream score at its first and last measured step, and the change (last − first) with a
    paired bootstrap interval over the items (the same items at both steps: resampled together). Only metrics
    whose value is the mean of their per-item scores (accuracies, F1, exact match); one row per (editor, run,
    task, metric) with n items. Each group's bootstrap stream is seeded by `seed` and the group's names, so a
    run's interval does not depend on which other runs are in `downstream`."""
    out = []
    for (editor, run, task, metric), g in downstream.groupby(["editor", "run", "task", "metric"]):
        rng = np.random.default_rng([seed, zlib.crc32(f"{editor}/{run}/{task}/{metric}".encode())])
        first, last = g.loc[g.step.idxmin()], g.loc[g.step.idxmax()]
        a, b = np.asarray(first["items"], dtype=float), np.asarray(last["items"], dtype=float)
        if first.step == last.step or len(a) != len(b) or not (np.isclose(a.mean(), first.value)
                                                               and np.isclose(b.mean(), last.value)):
            continue
        idx = rng.integers(0, len(a), size=(n_boot, len(a)))
        boot = (b[idx] - a[idx]).mean(axis=1)
        lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
        out.append(dict(editor=editor, run=run, task=task, metric=metric, n=len(a), step_first=int(first.step),
                        step_last=int(last.step), first=float(first.value), last=float(last.value),
                        change=float(last.value - first.value), change_low=float(lo), change_high=float(hi)))
    return pd.DataFrame(out)


EDITOR_LABELS = {"rome": "ROME", "c-rome": "C-ROME", "memit": "MEMIT", "alphaedit": "AlphaEdit", "ft-linf": "FT-L∞",
                 "mend": "MEND"}
SEQUENTIAL_RUNS = {"hard": "HardCF", "normal": "normal", "random": "random order"}
SEQUENTIAL_TASKS = (("lambada", "acc", "LAMBADA acc"), ("hellaswag", "acc_norm", "HellaSwag acc_norm"),
                    ("piqa", "acc_norm", "PIQA acc_norm"), ("squad2", "f1", "SQuAD 2.0 F1"))


def sequential_summary(rows: pd.DataFrame, downstream: pd.DataFrame, checkpoint_size: int = 1000,
                       threshold: float = COLLAPSE_THRESHOLD) -> pd.DataFrame:
    """Per (editor, run) of sequential runs: `collapse_steps`, ME-PPL_<checkpoint_size> at the first and last
    step that measured it, and per task of SEQUENTIAL_TASKS the `downstream_change` (first, last, change and
    its 95 % paired-bootstrap interval, n items) as columns "<task> <column>"."""
    out = collapse_steps(rows, threshold)
    checkpoints = checkpoint_table(rows, checkpoint_size)
    if len(checkpoints):
        out[f"ppl_{checkpoint_size}_start"] = checkpoints.apply(lambda r: r.dropna().iloc[0], axis=1)
        out[f"ppl_{checkpoint_size}_end"] = checkpoints.apply(lambda r: r.dropna().iloc[-1], axis=1)
        out[f"ppl_{checkpoint_size}_end_step"] = checkpoints.apply(lambda r: r.dropna().index[-1], axis=1)
    change = downstream_change(downstream) if len(downstream) else pd.DataFrame()
    for task, metric, _ in SEQUENTIAL_TASKS:
        if change.empty:
            break
        c = change[(change.task == task) & (change.metric == metric)].set_index(["editor", "run"])
        for column in ("n", "first", "last", "change", "change_low", "change_high"):
            out[f"{task} {column}"] = c[column].reindex(out.index)
    return out


def perplexity_text(x: float, decimals: int = 1, below: float = 1e5) -> str:
    """A perplexity as the README writes it: 1,114 below `below`, 6.0 × 10¹⁰ from there (`decimals`)."""
    if not math.isfinite(x) or x < below:
        return f"{x:,.0f}" if x >= 1000 or decimals == 1 else f"{x:.{decimals + 1}g}"
    exponent = int(math.floor(math.log10(x)))
    return (f"{x / 10 ** exponent:.{decimals}f} × 10"
            f"{str(exponent).translate(str.maketrans('0123456789', '⁰¹²³⁴⁵⁶⁷⁸⁹'))}")


def number_text(x: float) -> str:
    """A ratio or relative change as the README writes it: 2.85 below 100, 13,883 from there."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def sequential_summary_lines(summary: pd.DataFrame, labels: dict[str, str], runs: dict[str, str],
                             checkpoint_size: int = 1000) -> list[str]:
    """The README's two tables of `sequential_summary`, one row per (editor, run) in the order of `labels`
    ({editor: label}) and `runs` ({run: label}): perplexity and weights, then the downstream changes."""
    keys = [(e, r) for e in labels for r in runs if (e, r) in summary.index]
    ppl = [f"| sequence | edits | first step with ME-PPL_50 > {COLLAPSE_THRESHOLD:,.0f} | ME-PPL_50 at the end (largest) "
           f"| ME-PPL_{checkpoint_size // 1000}k, first → last | ‖W − W₀‖/‖W₀‖ | condition number × |",
           "|---|---|---|---|---|---|---|"]
    tasks = ["| sequence | " + " | ".join(label for _, _, label in SEQUENTIAL_TASKS) + " |",
             "|---|" + "---|" * len(SEQUENTIAL_TASKS)]
    for editor, run in keys:
        r = summary.loc[(editor, run)]
        name = f"{labels[editor]}, {runs[run]}"
        first = "never" if math.isnan(r.first_collapse_step) else f"**{int(r.first_collapse_step)}**"
        checkpoint = (f"{perplexity_text(r[f'ppl_{checkpoint_size}_start'])} → {perplexity_text(r[f'ppl_{checkpoint_size}_end'])}"
                      if f"ppl_{checkpoint_size}_start" in r else "")
        refused = f" ({int(r.refused)} refused)" if r.refused else ""
        ppl.append(f"| {name} | {int(r.steps)}{refused} | {first} | {perplexity_text(r.ppl_end)} ({perplexity_text(r.ppl_max)}) | "
                   f"{checkpoint} | {number_text(r.cum_rel_change_end)} | {number_text(r.cond_ratio_end)} |")
        cells = []
        for task, _, _ in SEQUENTIAL_TASKS:
            if f"{task} change" not in r or pd.isna(r[f"{task} change"]):
                cells.append("")
                continue
            cells.append(f"{r[f'{task} first']:.2f} → {r[f'{task} last']:.2f} ({r[f'{task} change']:+.2f}, "
                         f"{r[f'{task} change_low']:.2f} to {r[f'{task} change_high']:.2f})".replace("-", "−"))
        tasks.append(f"| {name} | " + " | ".join(cells) + " |")
    return ppl + [""] + tasks
