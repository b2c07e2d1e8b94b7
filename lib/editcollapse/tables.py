"""Queries and summaries over the results store that more than one notebook needs.

- `sweep_rows`: the rows of one sweep (experiment, model, editors) for a given sample of cases.
- `label_cases`: "collapse" / "normal" per row, and the label the same case got under a reference
  editor (ROME), so that C-ROME and the others can be compared on ROME's collapse cases.
- `single_edit_table`: the Butterfly-Effect single-editing comparison, one row per (editor,
  dataset): edits, refusals, collapse rate, perplexity, efficacy, generalisation, locality and the
  relative parameter change that every editor reports.
"""
from __future__ import annotations

import pandas as pd

from .perplexity import COLLAPSE_THRESHOLD

HEADLINE = ("efficacy", "generalization", "locality")


def sweep_rows(rows: pd.DataFrame, experiment: str, model: str, editors, cases: dict[str, list[dict]]) -> pd.DataFrame:
    """Rows of `experiment` on `model` by `editors` for the sampled `cases` ({dataset: [case, ...]})."""
    wanted = {(d, c["case_id"]) for d, sample in cases.items() for c in sample}
    if rows.empty:
        return rows
    keys = pd.Series(list(zip(rows.dataset, rows.case_id)), index=rows.index)
    picked = rows[(rows.experiment == experiment) & (rows.model == model) & rows.editor.isin(list(editors))
                  & keys.isin(wanted)]
    return picked.reset_index(drop=True)


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
    metrics (mean over successful edits) and the median relative parameter change ‖ΔW‖/‖W‖."""
    ok = rows[rows.error.isna()] if "error" in rows else rows
    refused = (rows.groupby(["editor", "dataset"]).error.apply(lambda e: int(e.notna().sum()))
               if "error" in rows else 0)
    table = ok.groupby(["editor", "dataset"]).agg(
        edits=("case_id", "size"), collapsed=("ppl", lambda p: int((p > threshold).sum())),
        max_ppl=("ppl", "max"), median_ppl=("ppl", "median"),
        **{m: (m, "mean") for m in HEADLINE if m in ok},
        median_rel_change=("rel_change", "median"), seconds_edit=("seconds_edit", "median"))
    table.insert(1, "refused", refused)
    table.insert(3, "collapse_rate", table.collapsed / table.edits)
    return table
