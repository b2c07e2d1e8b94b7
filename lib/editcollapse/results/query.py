"""One query over result rows: `select(rows, experiment=..., model=..., editor=[...], ok=True)`.

Every table, the guard, HardEdit and the notebooks read the store through it, so that "the rows of a sweep"
means the same thing everywhere.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

_MANY = (list, tuple, set, frozenset, range, np.ndarray, pd.Index, pd.Series)


def select(rows, *, ok: bool = False, cases=None, sort=None, **where) -> pd.DataFrame:
    """The rows of `rows` (a DataFrame or anything with `.read()`, such as a ResultStore) whose columns equal
    `where`'s values (a list, tuple, set, range, array or Series: any of them). `ok`: successful rows only (no
    `error`); `cases`: only these (dataset, case_id) pairs, or ({dataset: [case, ...]}); `sort`: columns to sort
    by. A column that the rows lack matches nothing (empty result); empty rows are returned as they are."""
    rows = rows.read() if hasattr(rows, "read") else rows
    if rows.empty:
        return rows
    keep = pd.Series(True, index=rows.index)
    for column, value in where.items():
        if column not in rows:
            return rows.iloc[:0]
        keep &= rows[column].isin(list(value)) if isinstance(value, _MANY) else rows[column] == value
    if ok and "error" in rows:
        keep &= rows.error.isna()
    if cases is not None:
        if isinstance(cases, dict):
            cases = {(d, c["case_id"]) for d, sample in cases.items() for c in sample}
        if not {"dataset", "case_id"} <= set(rows.columns):
            return rows.iloc[:0]
        pairs = pd.Series(list(zip(rows.dataset, rows.case_id)), index=rows.index)
        keep &= pairs.isin(set(cases))
    out = rows[keep]
    if sort:
        out = out.sort_values(sort)
    return out.reset_index(drop=True)
