"""Append-only results table (JSON Lines) keyed by a tuple of columns, for resumable sweeps.

Writing. One process writes a store at a time. The first write (`append`, `run_cases`, `writing()`)
takes an exclusive lock on ``<name>.jsonl.lock`` (``fcntl.flock``; local file systems) and keeps it
until `close()`, the end of `run_cases` / `writing()`, or the death of the process. The lock file sits
next to the data file's real path (symlinks resolved), so every path to one store meets the same lock.
A second writer fails at once with `StoreLocked`, which names the holder's pid. Each row is one line,
written with a single write + flush + fsync, so a killed writer leaves at most one incomplete last line.

Threads. Within a process, the stores of one file share the lock and a thread lock: `append` checks the
key and writes the row under it, so threads appending the same key store it once; the others get the
ValueError "already stored", as any append of a stored key does. `run_cases` skips a key that another
thread stored meanwhile, as it skips keys stored before it started.

Error rows. A row whose ``error`` column is set (not null) records a failed case. It counts as done
(`done()`), so a resumed sweep does not retry it, unless asked: `done(include_errors=False)` leaves
out the keys whose row is an error row, `run_cases(..., retry_errors=True)` runs them again, and
`append(row, replace_error=True)` writes a row for such a key. The file stays append-only: the later
row supersedes the error row (`read()` keeps the last row of a key, and a superseded error row is not
reported as a repeated key). A key whose row is not an error row is never written again.

Reading (`done()`, `read()`) takes no lock and never changes the file. A line that does not parse as
a JSON object (a write cut short, binary garbage, ``42``) is skipped with a warning that names the
file and the line. The next writer moves such lines to ``<name>.jsonl.rejected``: they are kept,
never deleted. A complete last row without its newline is a row like any other. Lines that repeat
a key are reported when the store is opened; `read()` keeps the last of them. A JSON object that
lacks a key column is an error (`StoreError`): the file was probably opened with the wrong key.

Values are converted to JSON: numpy scalars and arrays and torch tensors become Python
numbers and lists, tuples become lists. NaN and +-inf are written as Python's json writes
them (`NaN`, `Infinity`, `-Infinity`, outside strict JSON) and read back as floats.
Key columns must hold scalars (str, int, float, bool or None, not NaN); values that compare equal
in Python (3, 3.0, numpy.int64(3)) are the same key, while '3' and 3 are not.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import sys
import threading
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

_SCALARS = (str, int, float, bool, type(None))
# The keys of this project's stores: a single edit, a step of a sequential run, a downstream score at a step,
# an earlier edit of a sequential run scored again at its end (`edited_at`: the step that applied it).
ROW_KEY = ("experiment", "model", "editor", "dataset", "case_id")
SEQ_KEY = ("experiment", "run", "model", "editor", "step")
DOWNSTREAM_KEY = SEQ_KEY + ("task", "metric")
RETENTION_KEY = SEQ_KEY + ("edited_at",)


class StoreError(ValueError):
    """A results file that cannot be read as this store (the message names the file and the line)."""


class StoreLocked(StoreError):
    """Another process is writing the store."""


def _to_json(obj):
    """`default` hook of json.dumps: numpy and torch values as Python numbers or lists."""
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    torch = sys.modules.get("torch")  # a tensor exists only where torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    raise TypeError(f"cannot store a value of type {type(obj).__name__} as JSON: {obj!r:.80}")


def _dumps(obj) -> str:
    return json.dumps(obj, default=_to_json, allow_nan=True, ensure_ascii=False)


def _encode(row: dict) -> bytes:
    """One row as UTF-8 JSON."""
    line = _dumps(row)
    try:
        return line.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the row holds text that is not valid Unicode ({e.reason}: {line[e.start:e.end]!r} in "
                         f"...{line[max(0, e.start - 40):e.start]}); UTF-8 cannot store it") from None


def _append_bytes(path: Path, data: bytes) -> None:
    """One write, flushed and fsynced (the crash tests replace this to die half-way)."""
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- the one-writer lock
_HELD: dict[str, list] = {}  # lock file -> [fd, number of stores of this process holding it]
_GUARDS: dict[str, threading.RLock] = {}  # data file (real path) -> the thread lock of its stores in this process
_HELD_GUARD = threading.Lock()


def _guard(real_path: Path) -> threading.RLock:
    """The thread lock shared by this process's stores of the file at `real_path`."""
    with _HELD_GUARD:
        return _GUARDS.setdefault(str(real_path), threading.RLock())


def _is_error(row: dict) -> bool:
    """A row that records a failure: its ``error`` column is set (null and NaN mean no error)."""
    err = row.get("error")
    return err is not None and not (isinstance(err, float) and math.isnan(err))


def _lock(lock_path: Path, data_path: Path) -> str:
    """Take (or share within this process) the exclusive flock on `lock_path`; StoreLocked if another process has it."""
    name = os.path.realpath(lock_path)
    with _HELD_GUARD:
        if name in _HELD:
            _HELD[name][1] += 1
            return name
        fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "pid unknown"
            os.close(fd)
            raise StoreLocked(f"{data_path} is being written by another process ({holder}; lock {name}). One "
                              "writer per store: wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        _HELD[name] = [fd, 1]
        return name


def _unlock(name: str) -> None:
    with _HELD_GUARD:
        entry = _HELD.get(name)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[name]
            os.close(entry[0])  # releases the flock


# ---------------------------------------------------------------- the store
class ResultStore:
    """Rows in a JSONL file at `path`; a row's identity is its values in the `key` columns."""

    def __init__(self, path, key: tuple[str, ...]):
        key = (key,) if isinstance(key, str) else tuple(key)
        if not key or not all(isinstance(k, str) for k in key):
            raise ValueError(f"key must be a non-empty tuple of column names, not {key!r}")
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = Path(os.path.realpath(self.path))  # every read and write goes to the real file
        self.lock_path = self._file.with_name(self._file.name + ".lock")
        self.rejected_path = self._file.with_name(self._file.name + ".rejected")
        self._guard = _guard(self._file)
        self._lock_name: str | None = None
        self._release = None
        self._blocks = 0  # writing() blocks open now
        self._writer_before_blocks = False
        with self._guard:
            self._load(warn=True)

    # -- reading
    def _bytes(self) -> bytes:
        with self._guard:
            return self._file.read_bytes() if self._file.exists() else b""

    def _scan(self, data: bytes):
        """(rows [(line number, row, key)], lines that are not rows [(line number, bytes, why)])."""
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        rows, bad = [], []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                why = f"not UTF-8 ({e.reason} at byte {e.start})"
            except (ValueError, RecursionError) as e:
                why = f"not JSON ({e})"
            else:
                if isinstance(row, dict):
                    try:
                        rows.append((i, row, self._key_of(row)))
                    except (KeyError, ValueError) as e:
                        raise StoreError(f"{self.path}, line {i}: {e.args[0]} (is {self.key} the key of this "
                                         "file?)") from None
                    continue
                why = f"a JSON {type(row).__name__}, not an object"
            if i == len(lines) and not data.endswith(b"\n"):
                why += "; an incomplete last line, as a killed writer leaves"
            bad.append((i, line, why))
        return rows, bad

    def _load(self, warn: bool = False) -> None:
        data = self._bytes()
        rows, bad = self._scan(data)
        self._done, self._errors, dup, repeats = set(), set(), [], 0
        for _, row, k in rows:
            if k in self._done and k not in self._errors:  # a repeat that supersedes no error row
                repeats += 1
                if k not in dup:
                    dup.append(k)
            self._done.add(k)
            (self._errors.add if _is_error(row) else self._errors.discard)(k)
        self._sig = self._stat()
        self._ends_clean = not data or data.endswith(b"\n")
        if not warn:
            return
        if bad:
            self._warn_bad(bad, "skipped; the next writer moves them to " + str(self.rejected_path))
        if repeats:
            warnings.warn(f"{self.path}: {repeats} line(s) repeat the key of an earlier line (read() keeps the "
                          f"last of each): {[dict(zip(self.key, k)) for k in dup[:10]]}"
                          f"{' ...' if len(dup) > 10 else ''}", RuntimeWarning, stacklevel=3)

    def _warn_bad(self, bad, what: str) -> None:
        where = "; ".join(f"line {i}: {why}" for i, _, why in bad[:5]) + (" ..." if len(bad) > 5 else "")
        warnings.warn(f"{self.path}: {len(bad)} line(s) are not rows ({where}); {what}", RuntimeWarning, stacklevel=4)

    def _stat(self):
        try:
            st = os.stat(self._file)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _refresh(self) -> None:
        """Re-read the file if it changed since this object last read or wrote it."""
        if self._stat() != self._sig:
            self._load()

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
        if any(isinstance(v, float) and math.isnan(v) for v in out):
            raise ValueError(f"key values must not be NaN (NaN equals nothing, not even itself): {out!r}")
        return out

    def done(self, include_errors: bool = True) -> set[tuple]:
        """Keys of the rows stored now; without those whose row is an error row if ``include_errors=False``."""
        with self._guard:
            self._refresh()
            return set(self._done) if include_errors else self._done - self._errors

    def records(self) -> list[dict]:
        """All rows as written (dicts), in file order; a duplicated key keeps its last row (the one
        superseding an error row), in that row's place."""
        rows, bad = self._scan(self._bytes())
        if bad:
            self._warn_bad(bad, "skipped")
        last: dict[tuple, dict] = {}
        for _, row, k in rows:
            last.pop(k, None)
            last[k] = row
        return list(last.values())

    def read(self) -> pd.DataFrame:
        """All rows (`records`) as a table, key columns first."""
        df = pd.DataFrame(self.records())
        if df.empty:
            return pd.DataFrame(columns=list(self.key))
        rest = [c for c in df.columns if c not in self.key]
        return df[list(self.key) + rest].reset_index(drop=True)

    # -- writing
    def _become_writer(self) -> None:
        with self._guard:
            if self._lock_name is not None:
                return
            self._lock_name = _lock(self.lock_path, self.path)
            self._release = weakref.finalize(self, _unlock, self._lock_name)
            self._set_aside()
            self._refresh()

    def _set_aside(self) -> None:
        """Move the lines that are not rows to `rejected_path` (appended, fsynced), then drop them from the file."""
        data = self._bytes()
        _, bad = self._scan(data)
        if not bad:
            return
        _append_bytes(self.rejected_path, b"".join(line + b"\n" for _, line, _ in bad))
        drop = {i for i, _, _ in bad}
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        tmp = self._file.with_name(self._file.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(line + b"\n" for i, line in enumerate(lines, 1) if i not in drop))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._file)
        dir_fd = os.open(self._file.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._warn_bad(bad, f"moved them to {self.rejected_path}")

    def close(self) -> None:
        """Release the writer's lock (reading goes on working; a later write takes the lock again)."""
        with self._guard:
            if self._release is not None:
                self._release()
            self._lock_name = self._release = None

    @contextmanager
    def writing(self):
        """Hold the writer's lock for the block (fails at once with StoreLocked if another process has it).
        Blocks of several threads overlap: the lock is released when the last one ends, unless the store
        was the writer before the first began."""
        with self._guard:
            if self._blocks == 0:
                self._writer_before_blocks = self._lock_name is not None
            self._become_writer()
            self._blocks += 1
        try:
            yield self
        finally:
            with self._guard:
                self._blocks -= 1
                if self._blocks == 0 and not self._writer_before_blocks:
                    self.close()

    def append(self, row: dict, replace_error: bool = False) -> None:
        """Write one row (a dict of JSON-convertible values) durably; its key must be new, or, with
        ``replace_error=True``, may be that of an error row, which the new row supersedes.

        Makes this store the writer (see the module docstring) until `close()`.
        """
        self._put(row, replace_error, refuse=True)

    def _put(self, row: dict, replace_error: bool, refuse: bool) -> bool:
        """`append`; a key that may not be written raises ValueError if `refuse`, else returns False."""
        line = _encode(row)
        parsed = json.loads(line)
        k = self._key_of(parsed)
        with self._guard:
            self._become_writer()
            self._refresh()
            if k in self._done and not (replace_error and k in self._errors):
                if not refuse:
                    return False
                raise ValueError(f"key {dict(zip(self.key, k))} is already stored in {self.path}" +
                                 (" and its row is not an error row (only an error row is superseded)"
                                  if replace_error else ""))
            _append_bytes(self._file, (b"" if self._ends_clean else b"\n") + line + b"\n")
            self._done.add(k)
            (self._errors.add if _is_error(parsed) else self._errors.discard)(k)
            self._sig, self._ends_clean = self._stat(), True
        return True


def run_cases(store: ResultStore, items, fn, key_of, desc: str | None = None, retry_errors: bool = False) -> int:
    """Call fn(item) -> row for every item whose key_of(item) is not done yet; append each row.

    `fn` may return None: nothing is stored for the item, and the next run calls it again (a failure
    that is not the item's own). Key columns missing from the row are filled from key_of(item); a row whose key differs
    from key_of(item) is an error (it would be redone forever). The store's lock is held
    throughout, so a second writer fails before any work; a key that another thread stores
    meanwhile is skipped. ``retry_errors=True`` runs the items whose row is an error row again
    (the new row supersedes it). Returns the rows written.
    """
    include_errors = not retry_errors
    written = 0
    with store.writing():
        done = store.done(include_errors)
        pending, seen = [], set()
        for item in items:
            k = store.normalize_key(key_of(item))
            if k in seen:
                raise ValueError(f"two items share the key {dict(zip(store.key, k))}")
            seen.add(k)
            if k not in done:
                pending.append((k, item))
        label = f"{desc or store.path.stem} ({len(seen & done)} done before)"
        for k, item in tqdm(pending, desc=label):
            if k in store.done(include_errors):  # another thread stored it meanwhile
                continue
            got = fn(item)
            if got is None:
                continue
            row = {**dict(zip(store.key, k)), **got}
            if store.normalize_key([row[c] for c in store.key]) != k:
                raise ValueError(f"fn returned a row keyed {[row[c] for c in store.key]} for the item keyed {list(k)}")
            written += store._put(row, retry_errors, refuse=False)
    return written
