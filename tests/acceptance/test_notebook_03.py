"""Notebook 03 (sequential editing) runs headless on a tiny model and resumes without redoing a step."""
import pandas as pd
import pytest

from editcollapse.experiments.single import results_store
from editcollapse.reproduce import run

pytestmark = pytest.mark.acceptance


def test_notebook_03_runs_and_a_rerun_appends_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITCOLLAPSE_FIGURES", str(tmp_path / "figures"))
    results = tmp_path / "results"
    # notebook 02's sweep found two ROME collapse cases (a tiny random model has no real ones)
    store = results_store(results, "single_edit")
    for case_id in (7, 19):
        store.append(dict(experiment="single_edit_ppl50", model="tiny-llama", editor="rome", dataset="counterfact",
                          case_id=case_id, collapsed=True, error=None))
    overrides = dict(model="tiny-llama", device="cpu", results_dir=str(results), editors=["rome", "c-rome"],
                     n_cases=2, n_screen=0, random_editors=["c-rome"], n_random=3, downstream_tasks=["piqa"],
                     n_downstream=3)
    run("quick", only=["03"], overrides=overrides, executed_dir=tmp_path / "executed")
    rows = pd.read_json(results / "sequential.jsonl", lines=True)
    assert not rows.duplicated(["experiment", "run", "model", "editor", "step"]).any()
    assert set(rows.run) <= {"hard", "normal", "random"} and (rows.run == "random").sum() == 4
    hard = rows[rows.run == "hard"]
    assert set(hard.case_id.dropna()) == {7, 19} and len(hard) == 2 * 3  # both editors, steps 0..2: the tiny model's two hard cases
    assert len(pd.read_json(results / "sequential_downstream.jsonl", lines=True)) == 2 * 2 * 2  # hard and normal, two editors, piqa acc and acc_norm, at the last step
    assert {p.name for p in (tmp_path / "figures").glob("03_*.png")} >= {
        "03_sequential_ppl_tiny-llama.png", "03_sequential_param_change_tiny-llama.png"}
    run("quick", only=["03"], overrides=overrides, executed_dir=tmp_path / "executed")
    assert len(pd.read_json(results / "sequential.jsonl", lines=True)) == len(rows)
