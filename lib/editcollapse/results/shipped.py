"""Results of long runs, shipped with the repository as compact rows that the notebooks reuse.

`data/results/<profile>/` holds, for each results store of a profile's run (`results/<profile>/<name>.jsonl`),
its rows as `<name>.jsonl.gz` (JSON scalars, flat lists of them such as per-item scores, and dicts of these:
no tensor), and a card:
`card.json` (what ran, the command, the commit, the machine, the time, the rows per store and their
counts) with `CARD.md`, the same for a reader.

- `ship(results_dir, profile)` writes them from a run's stores. A sequential run is shipped only when
  complete (every step 0..n_steps stored, and its downstream rows with it): the weights of a run in
  progress are not shipped, so its rows could not be resumed from.
- `seed(profile, results_dir)` appends to a run's stores the shipped rows they lack. `make reproduce
  PROFILE=local` does it before the notebooks run, so they compute only what is missing and a fresh clone
  regenerates every figure from the shipped rows; RECOMPUTE=1 (`--recompute`) skips it.
"""
from __future__ import annotations

import gzip
import json
import subprocess
import time
from pathlib import Path

import pandas as pd

from .. import machine
from ..paths import REPO_ROOT, atomic_write_bytes, atomic_write_text, data_dir, in_repo
from .store import DOWNSTREAM_KEY, RETENTION_KEY, ROW_KEY, SEQ_KEY, ResultStore

SEQUENTIAL_RUN = ("experiment", "run", "model", "editor")  # the columns that name one sequential run
STORE_KEYS = {  # the stores that are shipped, with their key columns
    "single_edit": ROW_KEY, "sequential": SEQ_KEY, "sequential_downstream": DOWNSTREAM_KEY,
    "hardedit_sequential": SEQ_KEY, "hardedit_sequential_downstream": DOWNSTREAM_KEY,
    "sequential_retention": RETENTION_KEY, "safe_edit_sequential": SEQ_KEY, "safe_edit_retention": RETENTION_KEY,
    "guard_screen": ROW_KEY,  # notebook 07's screens: keys only, but 0.9 s a case on Qwen2.5-1.5B here
}
SECONDS_FILE = "notebook_seconds.json"  # written by the reproduce runner in the results folder


def shipped_dir(profile: str) -> Path:
    return data_dir() / "results" / profile


def _scalar(value, in_list: bool = False) -> bool:
    """What a shipped row may hold: a JSON scalar, a flat list of them (per-item scores, for intervals) or a
    dict of these; not a list of lists (a tensor, as the store writes it)."""
    if isinstance(value, dict) and not in_list:
        return all(isinstance(k, str) and _scalar(v) for k, v in value.items())
    if isinstance(value, list) and not in_list:
        return all(_scalar(v, in_list=True) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def complete_runs(rows: pd.DataFrame) -> set[tuple]:
    """The sequential runs (SEQUENTIAL_RUN values) whose rows hold every step 0..n_steps."""
    if rows.empty or "n_steps" not in rows or not set(SEQUENTIAL_RUN) <= set(rows):
        return set()
    out = set()
    for run, group in rows.groupby(list(SEQUENTIAL_RUN)):
        n = group.n_steps.dropna()
        if len(n) and set(group.step) == set(range(int(n.max()) + 1)):
            out.add(run)
    return out


def ship(results_dir: str | Path, profile: str, keys: dict[str, tuple] | None = None, command: str = "") -> dict:
    """Write the rows of the stores `keys` ({store name: its key columns}; default: those of STORE_KEYS that
    `results_dir` holds) to `shipped_dir(profile)`, with the card (the notebooks' seconds from the runner's
    SECONDS_FILE, where there is one); returns the card. Sequential rows (a `run` column) are kept
    for complete runs only; every other row is kept. Raises ValueError for a row that holds a tensor (a
    list of lists: it is not shipped)."""
    src, dest = in_repo(results_dir), shipped_dir(profile)
    keys = keys or {name: key for name, key in STORE_KEYS.items() if (src / f"{name}.jsonl").exists()}
    seconds = json.loads((src / SECONDS_FILE).read_text()) if (src / SECONDS_FILE).exists() else {}
    tables = {name: ResultStore(src / f"{name}.jsonl", key).records() if (src / f"{name}.jsonl").exists() else []
              for name, key in keys.items()}
    runs = set().union(*(complete_runs(pd.DataFrame(rows)) for rows in tables.values()))
    stores = {}
    for name, rows in tables.items():
        rows = [r for r in rows if "run" not in r or tuple(r.get(c) for c in SEQUENTIAL_RUN) in runs]
        bad = [(k, r.get("step", r.get("case_id"))) for r in rows for k, v in r.items() if not _scalar(v)]
        if bad:
            raise ValueError(f"{name}: rows hold tensors, which are not shipped (column, row): {bad[:5]}")
        text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=True) + "\n" for r in rows)
        # mtime 0: the same rows give the same bytes
        atomic_write_bytes(dest / f"{name}.jsonl.gz", gzip.compress(text.encode("utf-8"), mtime=0))
        stores[name] = dict(key=list(keys[name]), rows=len(rows), counts=_counts(pd.DataFrame(rows)))
    card = dict(profile=profile, command=command, commit=_commit(), machine=machine.describe(),
                created=time.strftime("%Y-%m-%d %H:%M:%S %Z"), notebook_seconds=seconds,
                complete_sequential_runs=len(runs), stores=stores)
    atomic_write_text(dest / "card.json", json.dumps(card, indent=1, default=str))
    atomic_write_text(dest / "CARD.md", card_markdown(card))
    return card


def records(profile: str, name: str) -> list[dict]:
    """The shipped rows of store `name` of `profile`, as written (ints stay ints)."""
    path = shipped_dir(profile) / f"{name}.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"no shipped rows {path}; shipped for {profile}: "
                                f"{sorted(p.name for p in shipped_dir(profile).glob('*.jsonl.gz'))}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(profile: str, name: str) -> pd.DataFrame:
    """The shipped rows of store `name` of `profile`, as a table."""
    return pd.DataFrame(records(profile, name))


def card(profile: str) -> dict:
    path = shipped_dir(profile) / "card.json"
    if not path.exists():
        raise FileNotFoundError(f"no shipped results for profile {profile!r} ({path})")
    return json.loads(path.read_text())


def seed(profile: str, results_dir: str | Path) -> dict[str, int]:
    """Append to the stores of `results_dir` the shipped rows of `profile` that they lack; returns the rows
    added per store (nothing when nothing is shipped for the profile)."""
    if not (shipped_dir(profile) / "card.json").exists():
        return {}
    added = {}
    for name, entry in card(profile)["stores"].items():
        store = ResultStore(in_repo(results_dir) / f"{name}.jsonl", tuple(entry["key"]))
        with store.writing():
            have, n = store.done(), 0
            for row in records(profile, name):
                if store.normalize_key([row.get(k) for k in store.key]) not in have:
                    store.append(row)
                    n += 1
        added[name] = n
    return added


def card_markdown(card: dict) -> str:
    """The card for a reader."""
    m = card["machine"]
    lines = [f"# Shipped results: profile `{card['profile']}`", "",
             f"- Command: `{card['command'] or 'make reproduce PROFILE=' + card['profile']}`",
             f"- Commit: `{card['commit']}`", f"- Machine: {machine.summary(m)}, torch {m['torch']}",
             f"- Written: {card['created']}",
             f"- Complete sequential runs: {card['complete_sequential_runs']} (runs in progress are not shipped)", ""]
    if card["notebook_seconds"]:
        lines += ["| notebook | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:,.0f} |" for k, v in card["notebook_seconds"].items()] + [""]
    for name, entry in card["stores"].items():
        lines += [f"## `{name}.jsonl.gz`: {entry['rows']} rows", "", f"Key: {', '.join(entry['key'])}.", ""]
        if entry["counts"]:
            cols = list(entry["counts"][0])
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(c[k]) for k in cols) + " |" for c in entry["counts"]] + [""]
    return "\n".join(lines)


def _counts(rows: pd.DataFrame) -> list[dict]:
    """Rows per experiment, editor (and run, model, task where present)."""
    by = [c for c in ("experiment", "model", "editor", "run", "task") if c in rows]
    if rows.empty or not by:
        return []
    return [{**dict(zip(by, k if isinstance(k, tuple) else (k,))), "rows": int(n)}
            for k, n in rows.groupby(by, dropna=False).size().items()]


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
