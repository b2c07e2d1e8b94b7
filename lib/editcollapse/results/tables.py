"""Summaries over result rows that more than one notebook needs.

- `sweep_rows` / `sequential_rows`: the rows of one sweep or of sequential runs (through `query.select`).
- `label_cases`: "collapse" / "normal" per row, and the label the same case got under a reference
  editor (ROME), so that C-ROME and the others can be compared on ROME's collapse cases.
- `single_edit_table`: the Butterfly-Effect single-editing comparison, one row per (editor,
  dataset): edits, refusals, collapse rate, perplexity, efficacy, generalisation, locality and the
  relative parameter change that every editor reports.
"""
from __future__ import annotations

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
    out["reference_case"] = [ref.get((d, c), "n/a") for d, c in zip(out.dataset, out.case_id)]
    return out


def single_edit_table(rows: pd.DataFrame, threshold: float = COLLAPSE_THRESHOLD) -> pd.DataFrame:
    """Per (editor, dataset): edits, refused, collapsed, collapse_rate, ppl (max, median), the headline
    metrics (mean over successful edits) and the median relative parameter change ‖ΔW‖/‖W‖.

    Edits of cases the editor was trained on (MEND's training split, column `trained_on`) are left
    out, so that every score is a held-out score; `trained_on_left_out` counts them."""
    seen = rows.trained_on.fillna(False).astype(bool) if "trained_on" in rows else pd.Series(False, index=rows.index)
    left_out = seen.groupby([rows.editor, rows.dataset]).sum().astype(int)
    rows = rows[~seen]
    ok = rows[rows.error.isna()] if "error" in rows else rows
    refused = (rows.groupby(["editor", "dataset"]).error.apply(lambda e: int(e.notna().sum()))
               if "error" in rows else 0)
    table = ok.groupby(["editor", "dataset"]).agg(
        edits=("case_id", "size"), collapsed=("ppl", lambda p: int(is_collapsed(p, threshold).sum())),
        max_ppl=("ppl", "max"), median_ppl=("ppl", "median"),
        **{m: (m, "mean") for m in HEADLINE if m in ok},
        median_rel_change=("rel_change", "median"), seconds_edit=("seconds_edit", "median"))
    table.insert(1, "refused", refused)
    table["trained_on_left_out"] = left_out.reindex(table.index, fill_value=0)
    table.insert(3, "collapse_rate", table.collapsed / table.edits)
    return table


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
