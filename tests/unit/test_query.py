"""The one query over result rows: equality or membership per column, successful rows, sampled cases, order;
on a DataFrame or on a store."""
import pandas as pd

from editcollapse.results.query import select
from editcollapse.results.store import ResultStore


def rows():
    return pd.DataFrame([
        dict(experiment="e", model="m", editor="rome", dataset="counterfact", case_id=3, ppl=50.0, error=None),
        dict(experiment="e", model="m", editor="c-rome", dataset="counterfact", case_id=1, ppl=40.0, error=None),
        dict(experiment="e", model="m", editor="rome", dataset="zsre", case_id=1, ppl=30.0, error=None),
        dict(experiment="e", model="m", editor="rome", dataset="counterfact", case_id=2, ppl=None, error="EditError: x"),
        dict(experiment="f", model="m", editor="rome", dataset="counterfact", case_id=1, ppl=20.0, error=None),
        dict(experiment="e", model="other", editor="memit", dataset="counterfact", case_id=1, ppl=10.0, error=None),
    ], index=[10, 11, 12, 13, 14, 15])


def key(df):
    return sorted(zip(df.experiment, df.model, df.editor, df.dataset, df.case_id))


def test_a_value_is_equality_and_a_list_is_membership():
    got = select(rows(), experiment="e", model="m", editor="rome")
    assert key(got) == [("e", "m", "rome", "counterfact", 2), ("e", "m", "rome", "counterfact", 3),
                        ("e", "m", "rome", "zsre", 1)]
    assert got.index.tolist() == [0, 1, 2]  # a fresh index
    for many in (["rome", "memit"], ("rome", "memit"), {"rome", "memit"}, pd.Series(["rome", "memit"])):
        assert len(select(rows(), editor=many)) == 5
    assert select(rows(), case_id=range(2, 4)).case_id.tolist() == [3, 2]
    assert len(select(rows())) == 6 and select(rows(), editor=[]).empty


def test_ok_keeps_successful_rows_only():
    assert select(rows(), ok=True, experiment="e", editor="rome").case_id.tolist() == [3, 1]
    no_error_column = rows().drop(columns="error")
    assert len(select(no_error_column, ok=True)) == 6


def test_cases_as_pairs_or_as_the_sample_by_dataset():
    sample = {"counterfact": [dict(case_id=1), dict(case_id=2)], "zsre": [dict(case_id=1)]}
    got = select(rows(), cases=sample, experiment="e", model="m")
    assert key(got) == [("e", "m", "c-rome", "counterfact", 1), ("e", "m", "rome", "counterfact", 2),
                        ("e", "m", "rome", "zsre", 1)]
    assert key(select(rows(), cases=[("zsre", 1)])) == [("e", "m", "rome", "zsre", 1)]
    assert select(rows(), cases=[]).empty


def test_a_missing_column_matches_nothing_and_empty_rows_come_back_as_they_are():
    assert select(rows(), run="hard").empty
    assert select(rows().drop(columns="dataset"), cases=[("zsre", 1)]).empty
    empty = pd.DataFrame(columns=["experiment", "case_id"])
    assert select(empty, experiment="e", run="hard") is empty


def test_sort_and_a_store_as_the_source(tmp_path):
    assert select(rows(), sort=["editor", "case_id"]).case_id.tolist() == [1, 1, 1, 1, 2, 3]
    store = ResultStore(tmp_path / "r.jsonl", ("experiment", "case_id"))
    for r in rows()[["experiment", "case_id", "ppl", "error"]].drop_duplicates(["experiment", "case_id"]).to_dict("records"):
        store.append(r)
    assert select(store, ok=True, experiment="e", sort="case_id").case_id.tolist() == [1, 3]
    assert select(ResultStore(tmp_path / "none.jsonl", ("experiment", "case_id")), experiment="e").empty
