"""Append-only results table (JSON Lines) keyed by a tuple of columns, for resumable sweeps.

Each row is one line written with a single write + flush + fsync, so a killed process leaves
at most a truncated last line. Opening the store drops such a line (with a warning): its row
is not in `done()` and gets redone. One writer per file.

Values are converted to JSON: numpy scalars and arrays and torch tensors become Python
numbers and lists, tuples become lists. NaN and +-inf are written as Python's json writes
them (`NaN`, `Infinity`, `-Infinity`, outside strict JSON) and read back as floats.
Key columns must hold scalars (str, int, float, bool or None); values that compare equal in
Python (3, 3.0, numpy.int64(3)) are the same key, while '3' and 3 are not.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

_SCALARS = (str, int, float, bool, type(None))


def _to_json(obj):
    """`default` hook of json.dumps: numpy and torch values as Python numbers or lists."""
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    raise TypeError(f"cannot store a value of type {type(obj).__name__} as JSON: {obj!r:.80}")


def _dumps(obj) -> str:
    return json.dumps(obj, default=_to_json, allow_nan=True, ensure_ascii=False)


class ResultStore:
    """Rows in a JSONL file at `path`; a row's identity is its values in the `key` columns."""

    def __init__(self, path, key: tuple[str, ...]):
        key = (key,) if isinstance(key, str) else tuple(key)
        if not key or not all(isinstance(k, str) for k in key):
            raise ValueError(f"key must be a non-empty tuple of column names, not {key!r}")
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._done = {self._key_of(r) for r in self._rows()}

    def _repair(self):
        """Cut a truncated last line (no trailing newline), left by a process killed mid-write."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            warnings.warn(f"{self.path}: dropped a truncated last line ({len(data) - keep} bytes); "
                          "its row will be redone", RuntimeWarning, stacklevel=3)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())

    def _rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for i, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}, line {i}: not a JSON row ({e}); fix or remove the line") from e
        return rows

    def _key_of(self, row: dict) -> tuple:
        missing = [k for k in self.key if k not in row]
        if missing:
            raise KeyError(f"row lacks the key column(s) {missing} of {self.path.name}: {sorted(row)}")
        return self.normalize_key(tuple(row[k] for k in self.key))

    def normalize_key(self, values) -> tuple:
        """The key as it reads back from the file (numpy/torch scalars become Python ones)."""
        values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
        if len(values) != len(self.key):
            raise ValueError(f"key {values!r} has {len(values)} values; the store's key is {self.key}")
        out = tuple(json.loads(_dumps(list(values))))
        if not all(isinstance(v, _SCALARS) for v in out):
            raise ValueError(f"key values must be scalars (str, int, float, bool, None), not {out!r}")
        return out

    def done(self) -> set[tuple]:
        """Keys of the rows already stored."""
        return set(self._done)

    def append(self, row: dict):
        """Write one row (a dict of JSON-convertible values) durably; its key must be new."""
        line = _dumps(row)
        k = self._key_of(json.loads(line))
        if k in self._done:
            raise ValueError(f"key {dict(zip(self.key, k))} is already stored in {self.path}")
        with open(self.path, "ab") as f:
            f.write((line + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self._done.add(k)

    def read(self) -> pd.DataFrame:
        """All rows, key columns first; a duplicated key keeps its last row."""
        df = pd.DataFrame(self._rows())
        if df.empty:
            return pd.DataFrame(columns=list(self.key))
        rest = [c for c in df.columns if c not in self.key]
        df = df.drop_duplicates(subset=list(self.key), keep="last")
        return df[list(self.key) + rest].reset_index(drop=True)


def run_cases(store: ResultStore, items, fn, key_of, desc: str | None = None) -> int:
    """Call fn(item) -> row for every item whose key_of(item) is not done yet; append each row.

    Key columns missing from the row are filled from key_of(item); a row whose key differs
    from key_of(item) is an error (it would be redone forever). Returns the rows written.
    """
    done, pending, seen = store.done(), [], set()
    for item in items:
        k = store.normalize_key(key_of(item))
        if k in seen:
            raise ValueError(f"two items share the key {dict(zip(store.key, k))}")
        seen.add(k)
        if k not in done:
            pending.append((k, item))
    label = f"{desc or store.path.stem} ({len(seen) - len(pending)} done before)"
    for k, item in tqdm(pending, desc=label):
        row = {**dict(zip(store.key, k)), **fn(item)}
        if store.normalize_key([row[c] for c in store.key]) != k:
            raise ValueError(f"fn returned a row keyed {[row[c] for c in store.key]} for the item keyed {list(k)}")
        store.append(row)
    return len(pending)
