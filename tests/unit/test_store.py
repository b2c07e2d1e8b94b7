"""The append-only JSONL results store: resume after a kill, keys, conversion, read(), bad lines kept,
one writer (file lock); property-based tests (hypothesis) for truncation and garbage."""
import json
import math
import subprocess
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from editcollapse.results.store import ResultStore, StoreError, StoreLocked, run_cases

KEY = ("experiment", "model", "case_id")


def item_key(i):
    return ("sweep", "tiny", i)


def make_row(i):
    return dict(ppl=np.float32(i + 0.5), hidden=torch.arange(3) * i, probs=np.array([0.25, 0.75]))


def expected(i):
    return dict(experiment="sweep", model="tiny", case_id=i, ppl=i + 0.5, hidden=[0, i, 2 * i], probs=[0.25, 0.75])


def quiet_store(path, key=KEY):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ResultStore(path, key)


def test_resume_after_a_kill_mid_write(tmp_path):
    path = tmp_path / "res.jsonl"
    calls = []

    def fn(i):
        calls.append(i)
        return make_row(i)

    assert run_cases(ResultStore(path, KEY), range(6), fn, item_key, desc="first") == 6
    lines = path.read_bytes().splitlines(keepends=True)
    half = lines[-1][: len(lines[-1]) // 2]  # a kill during the last write leaves half a line, no newline
    path.write_bytes(b"".join(lines[:-1]) + half)
    before = path.read_bytes()
    with pytest.warns(RuntimeWarning, match=r"res.jsonl: 1 line\(s\) are not rows \(line 6: .*incomplete last line"):
        store = ResultStore(path, KEY)
    assert store.done() == {item_key(i) for i in range(5)}
    with pytest.warns(RuntimeWarning, match="line 6"):
        assert len(store.read()) == 5
    assert path.read_bytes() == before  # reading changes nothing
    calls.clear()
    with pytest.warns(RuntimeWarning, match=r"moved them to .*res.jsonl.rejected"):
        assert run_cases(store, range(8), fn, item_key) == 3
    assert calls == [5, 6, 7]
    assert (tmp_path / "res.jsonl.rejected").read_bytes() == half + b"\n"  # kept, not deleted
    df = ResultStore(path, KEY).read()
    assert df.to_dict("records") == [expected(i) for i in range(8)]
    assert len(path.read_text().splitlines()) == 8  # no duplicate, no half line left


def test_a_complete_last_row_without_newline_is_kept(tmp_path):
    path = tmp_path / "res.jsonl"
    path.write_text('{"id": 1, "v": "a"}\n{"id": 2, "v": "b"}')  # appended by hand or by another tool
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        store = ResultStore(path, ("id",))
        assert store.done() == {(1,), (2,)}
        assert store.read().to_dict("records") == [dict(id=1, v="a"), dict(id=2, v="b")]
    assert path.read_text().endswith('"b"}')  # untouched
    store.append(dict(id=3, v="c"))
    assert path.read_text().splitlines() == ['{"id": 1, "v": "a"}', '{"id": 2, "v": "b"}', '{"id": 3, "v": "c"}']
    assert run_cases(store, [1, 2, 3, 4], lambda i: dict(v="new"), lambda i: i) == 1
    assert ResultStore(path, ("id",)).read().v.tolist() == ["a", "b", "c", "new"]


@pytest.mark.parametrize("bad, why", [
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"42", "a JSON int, not an object"),
    (b"null", "a JSON NoneType, not an object"),
    (b"[1, 2]", "a JSON list, not an object"),
    (b'{"id": ', "not JSON"),
])
def test_lines_that_are_not_rows_are_named_and_kept(tmp_path, bad, why):
    path = tmp_path / "res.jsonl"
    data = b'{"id": 1}\n' + bad + b'\n{"id": 3}\n'
    path.write_bytes(data)
    with pytest.warns(RuntimeWarning, match=rf"res.jsonl: 1 line\(s\) are not rows \(line 2: {why}"):
        store = ResultStore(path, ("id",))
    assert store.done() == {(1,), (3,)}
    with pytest.warns(RuntimeWarning, match="line 2"):
        assert store.read().id.tolist() == [1, 3]
    assert path.read_bytes() == data
    with pytest.warns(RuntimeWarning, match="moved them to"):
        store.append(dict(id=4))
    assert path.read_bytes() == b'{"id": 1}\n{"id": 3}\n{"id": 4}\n'
    assert (tmp_path / "res.jsonl.rejected").read_bytes() == bad + b"\n"


def test_a_row_without_the_key_names_file_and_line(tmp_path):
    path = tmp_path / "res.jsonl"
    path.write_text('{"id": 1}\n{"other": 2}\n')
    with pytest.raises(StoreError, match=r"res.jsonl, line 2: row lacks the key column\(s\) \['id'\]"):
        ResultStore(path, ("id",))
    path.write_text('{"id": [1, 2]}\n')
    with pytest.raises(StoreError, match="line 1: key values must be scalars"):
        ResultStore(path, ("id",))


def test_duplicated_lines_are_reported_when_opened(tmp_path):
    path = tmp_path / "res.jsonl"
    path.write_text("".join(json.dumps(dict(id=i % 3, v=i)) + "\n" for i in range(7)))
    with pytest.warns(RuntimeWarning, match=r"4 line\(s\) repeat the key .*\[\{'id': 0\}, \{'id': 1\}, \{'id': 2\}\]"):
        store = ResultStore(path, ("id",))
    assert store.read().to_dict("records") == [dict(id=1, v=4), dict(id=2, v=5), dict(id=0, v=6)]


def test_resume_after_an_exception(tmp_path):
    store = ResultStore(tmp_path / "res.jsonl", KEY)

    def failing(i):
        if i == 3:
            raise RuntimeError("edit diverged")
        return make_row(i)

    with pytest.raises(RuntimeError, match="diverged"):
        run_cases(store, range(5), failing, item_key)
    assert ResultStore(store.path, KEY).done() == {item_key(i) for i in range(3)}
    calls = []
    run_cases(ResultStore(store.path, KEY), range(5), lambda i: calls.append(i) or make_row(i), item_key)
    assert calls == [3, 4]


def test_key_collisions(tmp_path):
    store = ResultStore(tmp_path / "res.jsonl", ("a", "b"))
    store.append(dict(a="x|y", b="z", v=1))
    store.append(dict(a="x", b="y|z", v=2))  # would collide if keys were joined strings
    store.append(dict(a="1", b="z", v=3))
    store.append(dict(a=1, b="z", v=4))  # '1' and 1 are different keys
    with pytest.raises(ValueError, match="already stored"):
        store.append(dict(a=np.int64(1), b="z", v=5))  # the same key as 1
    with pytest.raises(ValueError, match="already stored"):
        store.append(dict(a="x|y", b="z", v=6))
    assert ResultStore(store.path, ("a", "b")).done() == {("x|y", "z"), ("x", "y|z"), ("1", "z"), (1, "z")}
    assert len(store.read()) == 4
    with pytest.raises(ValueError, match="share the key"):
        run_cases(store, [("p", "q"), ("p", "q")], lambda k: {}, lambda k: k)
    with pytest.raises(ValueError, match="keyed"):
        run_cases(store, [("p", "q")], lambda k: dict(a="p", b="other"), lambda k: k)
    with pytest.raises(KeyError, match="lacks the key"):
        store.append(dict(a="p"))
    with pytest.raises(ValueError, match="scalars"):
        store.append(dict(a=[1, 2], b="z"))
    with pytest.raises(ValueError, match="NaN"):
        store.append(dict(a=float("nan"), b="z"))
    with pytest.raises(ValueError, match="column names"):
        ResultStore(store.path, ())


def test_read_columns_and_duplicates(tmp_path):
    path = tmp_path / "res.jsonl"
    assert list(ResultStore(path, KEY).read().columns) == list(KEY)
    rows = [dict(ppl=1.5, case_id=0, model="m", experiment="e"),
            dict(case_id=1, model="m", experiment="e", ppl=2.5, extra="x"),
            dict(case_id=0, model="m", experiment="e", ppl=9.0)]  # a duplicate written by another process
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = quiet_store(path).read()
    assert list(df.columns) == [*KEY, "ppl", "extra"]
    assert df[["case_id", "ppl"]].values.tolist() == [[1, 2.5], [0, 9.0]]


def test_values_round_trip(tmp_path):
    store = ResultStore(tmp_path / "res.jsonl", ("id",))
    store.append(dict(id=np.int64(7), nan=float("nan"), inf=np.float64("inf"), neg=-math.inf,
                      t=torch.tensor(2.5), m=torch.ones(2, 2), pair=(1, "a"), nested={"x": np.float16(0.5)},
                      text="Zürich 東京"))
    row = ResultStore(store.path, ("id",)).read().iloc[0].to_dict()
    assert math.isnan(row.pop("nan"))
    assert row == dict(id=7, inf=math.inf, neg=-math.inf, t=2.5, m=[[1.0, 1.0], [1.0, 1.0]], pair=[1, "a"],
                       nested={"x": 0.5}, text="Zürich 東京")
    before = store.path.read_bytes()
    with pytest.raises(TypeError, match="object"):
        store.append(dict(id=8, bad=object()))
    with pytest.raises(ValueError, match=r"not valid Unicode \(surrogates not allowed: '\\udc80' in"):
        store.append(dict(id=8, name=b"caf\x80".decode("utf-8", "surrogateescape")))
    assert store.path.read_bytes() == before and (8,) not in store.done()


# ---------------------------------------------------------------- one writer
HOLDER = """
import sys
from editcollapse.results.store import ResultStore
store = ResultStore(sys.argv[1], ("id",))
store.append(dict(id=0))
print("holding", flush=True)
sys.stdin.read()
"""


@contextmanager
def holding(path):
    """Another process that wrote row {"id": 0} to the store at `path` and holds its lock until the block ends
    (then it exits, and its lock dies with it); yields the process."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        yield holder
    except BaseException:
        holder.kill()
        raise
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_second_writer_fails_at_once(tmp_path):
    path = tmp_path / "res.jsonl"
    with holding(path) as holder:
        store = ResultStore(path, ("id",))  # reading needs no lock
        assert store.done() == {(0,)}
        calls = []
        with pytest.raises(StoreLocked, match=rf"res.jsonl is being written by another process \(pid {holder.pid} "):
            run_cases(store, range(3), lambda i: calls.append(i) or {}, lambda i: i)
        assert calls == []  # it failed before any work
        with pytest.raises(StoreLocked, match=str(holder.pid)):
            store.append(dict(id=1))
    assert run_cases(store, range(3), lambda i: {}, lambda i: i) == 2  # the lock died with its holder
    assert path.read_text().count("\n") == 3


def test_stores_of_one_process_share_the_lock_and_see_each_other(tmp_path):
    a, b = ResultStore(tmp_path / "res.jsonl", ("id",)), ResultStore(tmp_path / "res.jsonl", ("id",))
    a.append(dict(id=1))
    b.append(dict(id=2))
    with pytest.raises(ValueError, match="already stored"):
        b.append(dict(id=1))  # b re-reads what a wrote before appending
    assert run_cases(a, [1, 2, 3], lambda i: {}, lambda i: i) == 1
    a.close()
    b.close()
    assert (tmp_path / "res.jsonl").read_text().splitlines() == ['{"id": 1}', '{"id": 2}', '{"id": 3}']


# ---------------------------------------------------------------- property-based
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
rows_strategy = st.dictionaries(st.integers(0, 30), st.dictionaries(st.text(max_size=6).filter(lambda s: s != "id"),
                                                                    json_values, max_size=4), max_size=10)
garbage = st.binary(max_size=60).filter(lambda g: b"{" not in g and b"}" not in g)  # can never complete a row


def nonblank_lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n") if line.strip()]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy, cut=st.floats(0, 1), junk=garbage, newline_first=st.booleans())
def test_property_truncation_and_garbage_never_lose_or_duplicate_rows(rows, cut, junk, newline_first):
    """Write rows, cut the file anywhere, append garbage: reading changes nothing; the writer keeps every
    line (in the file or the side file); finishing the sweep leaves every key exactly once, and every
    row whose line survived the cut unchanged and not redone."""
    with tempfile.TemporaryDirectory() as tmp:
        path, rejected = Path(tmp) / "res.jsonl", Path(tmp) / "res.jsonl.rejected"
        store = ResultStore(path, ("id",))
        for k, v in rows.items():
            store.append(dict(v, id=k))
        store.close()
        full = path.read_bytes() if path.exists() else b""
        line_of = {json.loads(line)["id"]: line for line in nonblank_lines(full)}
        prefix = full[: int(cut * len(full))]
        intact = {line for line in prefix.split(b"\n")[:-1] if line.strip()}  # lines that kept their newline
        data = prefix + (b"\n" if newline_first else b"") + junk
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            reader = ResultStore(path, ("id",))
            seen = reader.done()
            reader.read()
            assert path.read_bytes() == data  # reading never changes the file
            redone = run_cases(reader, sorted(rows), lambda k: dict(rows[k], redone=True), lambda k: k)
        assert {line_of[k] for (k,) in seen} >= intact and redone == len(rows) - len(seen)
        final = nonblank_lines(path.read_bytes())
        side = nonblank_lines(rejected.read_bytes()) if rejected.exists() else []
        assert sorted(final[: len(final) - redone] + side) == sorted(nonblank_lines(data))  # nothing deleted
        by_id = {json.loads(line)["id"]: line for line in final}
        assert len(by_id) == len(final) and set(by_id) == set(rows)  # no row lost, none duplicated
        for k, line in by_id.items():
            assert line == line_of[k] if (k,) in seen else json.loads(line)["redone"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert sorted(ResultStore(path, ("id",)).read().id) == sorted(rows)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200) | st.lists(st.sampled_from(
    [b'{"id": 1}', b'{"id": 2, "x": [1, 2]}', b"42", b"null", b"\xff\xfe", b'{"id": ', b"", b"[]", b"NaN", b'"s"',
     b'{"id": "1"}', b'{"no": 1}', b"\x00\x00"]), max_size=8).map(b"\n".join))
def test_property_reading_any_bytes_raises_only_store_errors(data):
    """Any file content: opening and reading either work or raise StoreError, and never change the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "res.jsonl"
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                store = ResultStore(path, ("id",))
                df = store.read()
                assert set(df.id.tolist()) == {k for (k,) in store.done()}
        except StoreError as e:
            assert "res.jsonl, line " in str(e)
        assert path.read_bytes() == data


# ---------------------------------------------------------------- error rows
def test_an_error_row_is_superseded_only_when_asked(tmp_path):
    """A row with `error` set counts as done; append(replace_error=True) writes a later row for its key, which
    read() keeps, and done(include_errors=False) leaves error rows out. A row without error is never replaced."""
    path = tmp_path / "res.jsonl"
    store = ResultStore(path, ("id",))
    store.append(dict(id=1, error=None, v=1))
    store.append(dict(id=2, error="EditError: diverged"))
    store.append(dict(id=3, v=3))  # no error column: not an error row
    assert store.done() == {(1,), (2,), (3,)} and store.done(include_errors=False) == {(1,), (3,)}
    with pytest.raises(ValueError, match=r"key \{'id': 2\} is already stored"):
        store.append(dict(id=2, error=None, v=2))
    for k in (1, 3):
        with pytest.raises(ValueError, match=rf"'id': {k}\}} is already stored .* its row is not an error row"):
            store.append(dict(id=k, error=None, v=-1), replace_error=True)
    store.append(dict(id=2, error="EditError: diverged again"), replace_error=True)  # an error supersedes an error
    store.append(dict(id=2, error=None, v=2), replace_error=True)
    assert store.done(include_errors=False) == {(1,), (2,), (3,)}
    with pytest.raises(ValueError, match="not an error row"):
        store.append(dict(id=2, error=None, v=-2), replace_error=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # superseded error rows are not reported as repeated keys
        reopened = ResultStore(path, ("id",))
        df = reopened.read()
        assert df.id.tolist() == df.v.tolist() == [1, 3, 2] and df.error.isna().all()
        assert reopened.done(include_errors=False) == {(1,), (2,), (3,)}
    assert len(path.read_text().splitlines()) == 5  # append-only: the error rows stay in the file
    path.write_text(path.read_text() + '{"id": 1, "v": 9}\n')  # a repeat of a row that was no error row
    with pytest.warns(RuntimeWarning, match=r"1 line\(s\) repeat the key .*\[\{'id': 1\}\]"):
        ResultStore(path, ("id",))


def test_run_cases_retries_error_rows_when_asked(tmp_path):
    store = ResultStore(tmp_path / "res.jsonl", ("id",))
    fail = {1, 3}
    row = lambda i: dict(error="RuntimeError: refused" if i in fail else None, v=i)  # noqa: E731
    assert run_cases(store, range(5), row, lambda i: i) == 5
    assert run_cases(store, range(5), row, lambda i: i) == 0  # error rows count as done
    fail = {3}
    calls = []
    assert run_cases(store, range(5), lambda i: calls.append(i) or row(i), lambda i: i, retry_errors=True) == 2
    assert calls == [1, 3] and store.done(include_errors=False) == {(0,), (1,), (2,), (4,)}
    df = ResultStore(store.path, ("id",)).read().set_index("id").sort_index()
    assert df.error.notna().tolist() == [False, False, False, True, False] and df.v.tolist() == list(range(5))
