"""Sweeps on Ray: a local Ray instance with two CPU workers, tiny models.

Every case is processed exactly once, a worker killed mid-run loses nothing, a rerun does only what
is missing, and the rows equal those of the single-process sweep.
"""
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from editcollapse import data  # noqa: E402
from editcollapse.experiments.distributed import GuardScreen, SequentialRuns, SingleEdit, ray_sweep  # noqa: E402
from editcollapse.experiments.single import results_store, single_edit_sweep  # noqa: E402
from editcollapse.experiments.sequential import sequential_run, sequential_store  # noqa: E402
from tests.fast import FAST  # noqa: E402

TIMING = ("seconds_edit", "seconds_total", "seconds_step")


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need KillOnce below
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def cases(n=6):
    return data.load_counterfact(n=n, seed=5)


def comparable(df, drop=()):
    df = df.drop(columns=[c for c in (*TIMING, *drop) if c in df]).sort_values(["case_id"]).reset_index(drop=True)
    return df[sorted(df.columns)]


@pytest.mark.slow
def test_every_case_once_and_the_rows_of_one_process(local_ray, tiny_models, tmp_path):
    job = SingleEdit("rome", editor_kwargs=dict(hparams=FAST))
    store = results_store(tmp_path, "ray")
    assert ray_sweep(job, "tiny-llama", cases(), store, workers=2, progress=False) == 6
    got = store.read()
    assert sorted(got.case_id) == sorted(c["case_id"] for c in cases())  # each case once, none lost

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run
    try:
        alone = results_store(tmp_path, "one_process")
        single_edit_sweep(tiny_models("tiny-llama"), "rome", cases(), alone, experiment="single_edit_ppl50",
                          editor_kwargs=dict(hparams=FAST))
    finally:
        torch.set_num_threads(threads)
    a, b = comparable(got), comparable(alone.read())
    assert list(a.columns) == list(b.columns)
    assert a.drop(columns=["ppl", "ppl_median"]).equals(b.drop(columns=["ppl", "ppl_median"]))
    assert a.ppl.tolist() == pytest.approx(b.ppl.tolist(), rel=1e-6)

    # a rerun finds everything done; more cases run only the new ones
    assert ray_sweep(job, "tiny-llama", cases(), store, workers=2, progress=False) == 0
    assert ray_sweep(job, "tiny-llama", cases(8), store, workers=2, progress=False) == 2
    assert len(store.read()) == 8


@dataclass
class KillOnce(SingleEdit):
    """Kills its worker process the first time it meets `victim` (the marker file remembers)."""

    victim: int = -1
    marker: str = ""

    def rows(self, lm, items):
        if any(c["case_id"] == self.victim for c in items) and not Path(self.marker).exists():
            Path(self.marker).touch()
            os._exit(1)
        return super().rows(lm, items)


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_nothing(local_ray, tmp_path):
    victim = cases()[3]["case_id"]
    job = KillOnce("rome", editor_kwargs=dict(hparams=FAST), victim=victim, marker=str(tmp_path / "killed"))
    store = results_store(tmp_path, "ray")
    assert ray_sweep(job, "tiny-llama", cases(), store, workers=2, chunk=1, progress=False) == 6
    assert (tmp_path / "killed").exists()  # the worker did die
    rows = store.read()
    assert sorted(rows.case_id) == sorted(c["case_id"] for c in cases()) and rows.error.isna().all()
    assert len(store.path.read_text().splitlines()) == 6  # no line written twice


@pytest.mark.slow
def test_sequential_runs_and_guard_screen_give_the_single_process_rows(local_ray, tiny_models, tmp_path):
    seqs = [dict(editor="rome", run="a", cases=cases(3)), dict(editor="c-rome", run="b", cases=cases(2))]
    store = sequential_store(tmp_path, "seq")
    assert ray_sweep(SequentialRuns(), "tiny-llama", seqs, store, workers=2, progress=False) == 4 + 3
    rows = store.read()
    assert sorted(zip(rows.editor, rows.step)) == [("c-rome", s) for s in range(3)] + [("rome", s) for s in range(4)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = sequential_store(tmp_path, "seq_alone")
        sequential_run(tiny_models("tiny-llama"), "rome", cases(3), alone, run="a", state_dir=tmp_path / "state")
    finally:
        torch.set_num_threads(threads)
    a = rows[rows.editor == "rome"].drop(columns=list(TIMING), errors="ignore").sort_values("step").reset_index(drop=True)
    b = alone.read().drop(columns=list(TIMING), errors="ignore").sort_values("step").reset_index(drop=True)
    assert a.ppl.tolist() == pytest.approx(b.ppl.tolist(), rel=1e-6)
    assert a.cum_rel_change.tolist() == pytest.approx(b.cum_rel_change.tolist(), rel=1e-6)

    screen = results_store(tmp_path, "screen")
    assert ray_sweep(GuardScreen(), "tiny-llama", cases(), screen, workers=2, chunk=3, progress=False) == 6
    from editcollapse.guard import key_features

    got = screen.read().sort_values("case_id")
    want = key_features(tiny_models("tiny-llama"), cases()).sort_values("case_id")
    assert got.denominator.tolist() == pytest.approx(want.denominator.tolist(), rel=1e-5)


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    store = results_store(tmp_path, "ray")
    with pytest.raises(ValueError, match="no-such-editor"):
        SingleEdit("no-such-editor")
    with pytest.raises(ValueError, match="threads"):
        ray_sweep(SingleEdit("rome"), "tiny-llama", cases(), store, threads=0)
    with pytest.raises(ValueError, match="share the key"):
        ray_sweep(SingleEdit("rome"), "tiny-llama", cases() + cases(1), store)
    assert not store.path.exists()


def test_a_failure_while_measuring_gives_no_row_so_the_next_sweep_retries_it(tiny_models, monkeypatch):
    """A Ray worker's chunk leaves out a case whose measurement failed (experiments.FailedEdit), instead of
    storing it as an error row that no rerun would retry; a refused case is still a row."""
    from editcollapse.eval import perplexity

    lm = tiny_models("tiny-gpt2")
    job = SingleEdit("rome", editor_kwargs=dict(hparams=FAST))
    job.setup(lm)
    real, calls = perplexity.me_ppl, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(perplexity, "me_ppl", flaky)
    items = cases(2) + [dict(cases(1)[0], case_id=-1, subject="Nowhere in the prompt")]
    rows = job.rows(lm, items)
    assert [r["case_id"] for r in rows] == [items[1]["case_id"], -1]
    assert rows[0]["error"] is None and rows[1]["error"].startswith("EditError")
