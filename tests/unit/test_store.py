"""The append-only JSONL results store: resume after a kill, keys, conversion, read()."""
import json
import math

import numpy as np
import pytest
import torch

from editcollapse.store import ResultStore, run_cases

KEY = ("experiment", "model", "case_id")


def item_key(i):
    return ("sweep", "tiny", i)


def make_row(i):
    return dict(ppl=np.float32(i + 0.5), hidden=torch.arange(3) * i, probs=np.array([0.25, 0.75]))


def expected(i):
    return dict(experiment="sweep", model="tiny", case_id=i, ppl=i + 0.5, hidden=[0, i, 2 * i], probs=[0.25, 0.75])


def test_resume_after_a_kill_mid_write(tmp_path):
    path = tmp_path / "res.jsonl"
    calls = []

    def fn(i):
        calls.append(i)
        return make_row(i)

    assert run_cases(ResultStore(path, KEY), range(6), fn, item_key, desc="first") == 6
    lines = path.read_bytes().splitlines(keepends=True)
    # a kill during the last write leaves half a line without its newline
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    with pytest.warns(RuntimeWarning, match="truncated"):
        store = ResultStore(path, KEY)
    assert store.done() == {item_key(i) for i in range(5)}
    calls.clear()
    assert run_cases(store, range(8), fn, item_key) == 3
    assert calls == [5, 6, 7]
    df = ResultStore(path, KEY).read()
    assert df.to_dict("records") == [expected(i) for i in range(8)]
    assert len(path.read_text().splitlines()) == 8  # no duplicate, no half line left


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
    with pytest.raises(ValueError, match="column names"):
        ResultStore(store.path, ())


def test_read_columns_and_duplicates(tmp_path):
    path = tmp_path / "res.jsonl"
    assert list(ResultStore(path, KEY).read().columns) == list(KEY)
    rows = [dict(ppl=1.5, case_id=0, model="m", experiment="e"),
            dict(case_id=1, model="m", experiment="e", ppl=2.5, extra="x"),
            dict(case_id=0, model="m", experiment="e", ppl=9.0)]  # a duplicate written by another process
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = ResultStore(path, KEY).read()
    assert list(df.columns) == [*KEY, "ppl", "extra"]
    assert df[["case_id", "ppl"]].values.tolist() == [[1, 2.5], [0, 9.0]]


def test_values_round_trip(tmp_path):
    store = ResultStore(tmp_path / "res.jsonl", ("id",))
    store.append(dict(id=np.int64(7), nan=float("nan"), inf=np.float64("inf"), neg=-math.inf,
                      t=torch.tensor(2.5), m=torch.ones(2, 2), pair=(1, "a"), nested={"x": np.float16(0.5)}))
    row = ResultStore(store.path, ("id",)).read().iloc[0].to_dict()
    assert math.isnan(row.pop("nan"))
    assert row == dict(id=7, inf=math.inf, neg=-math.inf, t=2.5, m=[[1.0, 1.0], [1.0, 1.0]], pair=[1, "a"],
                       nested={"x": 0.5})
    before = store.path.read_bytes()
    with pytest.raises(TypeError, match="object"):
        store.append(dict(id=8, bad=object()))
    assert store.path.read_bytes() == before and (8,) not in store.done()


def test_corrupt_line_inside_the_file(tmp_path):
    path = tmp_path / "res.jsonl"
    path.write_text('{"id": 1}\n{"id": \n{"id": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        ResultStore(path, ("id",))
