"""Errors in a single-edit sweep: a failure that is not the case's fault is not stored, so a rerun retries it;
a refused edit is stored as an error row, counted in the summary, and edited again with retry_errors=True."""
import pytest

from editcollapse import data

from editcollapse.experiments import single
from editcollapse.experiments.single import FailedEdit, results_store, single_edit_row, single_edit_sweep
from editcollapse.editors import ROME, live_edits
from editcollapse.hardcases import hardcf
from tests.fast import FAST
from tests.weights import identical, snapshot

SWEEP = dict(experiment="single_edit_ppl50", ppl_size=50, editor_kwargs=dict(hparams=FAST))


@pytest.fixture(scope="module")
def cases():
    good = data.load_counterfact(n=2, seed=0)
    refused = dict(good[0], case_id=10**7, subject="Zzyzx")  # not in its prompt: refused before any edit
    return good + [refused]


def flaky_me_ppl(monkeypatch, fail_calls: set):
    """me_ppl that raises on the calls numbered in `fail_calls` (0-based), as an out-of-memory would."""
    real, calls = single.perplexity.me_ppl, []

    def me_ppl(*args, **kw):
        calls.append(1)
        if len(calls) - 1 in fail_calls:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(single.perplexity, "me_ppl", me_ppl)
    return calls


def test_a_failure_while_measuring_is_not_stored_and_a_rerun_retries_it(tiny_models, tmp_path, cases, monkeypatch):
    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    store = results_store(tmp_path, "single_edit")
    flaky_me_ppl(monkeypatch, {0})  # the first case's measurement fails
    first = single_edit_sweep(lm, "rome", cases, store, **SWEEP)
    assert identical(lm, before) and not live_edits(lm)  # the failed edit was undone
    counts = ("cases", "done_before", "stored", "failed", "error_rows")
    assert [first[k] for k in counts] == [3, 0, 2, 1, 1]
    assert first["failures"][0]["case_id"] == cases[0]["case_id"]
    assert "RuntimeError while measuring the edited model: CUDA out of memory" in first["failures"][0]["error"]
    rows = store.read().set_index("case_id")
    assert cases[0]["case_id"] not in rows.index and "not in prompt" in rows.error[10**7]
    again = single_edit_sweep(lm, "rome", cases, results_store(tmp_path, "single_edit"), **SWEEP)
    assert (again["done_before"], again["stored"], again["failed"], again["error_rows"]) == (2, 1, 0, 1)
    rows = store.read().set_index("case_id")
    assert rows.error.isna()[cases[0]["case_id"]] and rows.ppl[cases[0]["case_id"]] > 0


def test_single_edit_row_raises_failures_only_when_asked(tiny_models, cases, monkeypatch):
    lm = tiny_models("tiny-llama")
    editor = ROME(hparams=FAST)
    flaky_me_ppl(monkeypatch, {0, 1})
    assert "out of memory" in single_edit_row(lm, editor, cases[0])["error"]  # a row, as before
    with pytest.raises(FailedEdit, match="while measuring the edited model"):
        single_edit_row(lm, editor, cases[0], raise_failures=True)
    refused = single_edit_row(lm, editor, cases[2], raise_failures=True)  # a refusal is a row, never raised
    assert "not in prompt" in refused["error"]


def test_retry_errors_edits_error_rows_again(tiny_models, tmp_path, cases):
    """An error row (here one written as the sweep wrote measuring failures before) is kept by a rerun, and
    edited again, its new row superseding it, with retry_errors=True; also through hardcf.sweep_missing."""
    lm = tiny_models("tiny-llama")
    store = results_store(tmp_path, "single_edit")
    for c in cases[:2]:
        store.append(dict(experiment=SWEEP["experiment"], model=lm.spec.name, editor="rome", dataset=c["dataset"],
                          case_id=c["case_id"], error="RuntimeError while measuring the edited model: out of memory"))
    store.close()
    kept = single_edit_sweep(lm, "rome", cases[:1], store, **SWEEP)
    assert (kept["stored"], kept["error_rows"], kept["retried"]) == (0, 1, 0)
    redone = single_edit_sweep(lm, "rome", cases[:1], store, retry_errors=True, **SWEEP)
    assert (redone["stored"], redone["retried"], redone["error_rows"]) == (1, 1, 0)
    assert hardcf.sweep_missing(lm, "rome", cases[1:2], store, results_dir=tmp_path, **SWEEP) == 0
    assert hardcf.sweep_missing(lm, "rome", cases[1:2], store, results_dir=tmp_path, retry_errors=True, **SWEEP) == 1
    rows = store.read()
    assert len(rows) == 2 and rows.error.isna().all() and (rows.ppl > 0).all()


def test_a_sweep_reports_what_it_did_and_stays_quiet_when_everything_was_stored(tiny_models, tmp_path, cases, capsys):
    lm = tiny_models("tiny-llama")
    first = single_edit_sweep(lm, "rome", cases[:1], results_store(tmp_path, "single_edit"), **SWEEP)
    assert first["stored"] == 1 and "1 cases, 0 done before, 1 stored now" in capsys.readouterr().out
    again = single_edit_sweep(lm, "rome", cases[:1], results_store(tmp_path, "single_edit"), **SWEEP)
    assert (again["done_before"], again["stored"]) == (1, 0) and "done before" not in capsys.readouterr().out
