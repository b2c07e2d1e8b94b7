"""Notebook 06 (safe hard edits) runs headless on a tiny model: tuning, single edits split tune/test, one sequence
with retention, the targets; a rerun edits nothing."""
import json

import pandas as pd
import pytest

from editcollapse import data
from editcollapse.analysis import safe_edit
from editcollapse.reproduce import run

pytestmark = pytest.mark.acceptance


def test_notebook_06_runs_and_a_rerun_edits_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITCOLLAPSE_FIGURES", str(tmp_path / "figures"))
    results = tmp_path / "results"
    cf = data.load_counterfact(n=40, seed=3)
    hardcf, hardedit = tmp_path / "hardcf.json", tmp_path / "hardedit.json"  # the tiny model's "hard" cases
    hardcf.write_text(json.dumps([dict(case_id=c["case_id"]) for c in cf[:4]]))
    hardedit.write_text(json.dumps([dict(c, case_id=10**9 + i) for i, c in enumerate(cf[4:8])]))
    overrides = dict(model="tiny-llama", device="cpu", results_dir=str(results), n_normal=2, n_hard=4,
                     hardcf_path=str(hardcf), hardedit_path=str(hardedit), n_tune=2, n_sequential=3,
                     tune_grid={"clamp4": {"clamp_norm_factor": 4.0, "v_num_grad_steps": 25}, "clamp12": {"clamp_norm_factor": 12.0, "v_num_grad_steps": 25},
                                "memit-2k": {"editor": "memit-2k"}, "rome_prune": {"editor": "rome", "prune_log_base": 2.0}})
    run("quick", only=["06"], overrides=overrides, executed_dir=tmp_path / "executed")
    rows = pd.read_json(results / "single_edit.jsonl", lines=True)
    assert not rows.duplicated(["experiment", "model", "editor", "dataset", "case_id"]).any()
    single = rows[rows.experiment == "single_edit_ppl50"]
    assert set(single.editor) == {"rome", "c-rome", "c-rome-prefix", "rome-2k", "memit-2k"}
    # only the test half is edited; C-ROME with a prefix on its hard cases only
    hard_test = {c["case_id"] for c in cf[:4]} | {10**9 + i for i in range(4)}
    hard_test = {i for i in hard_test if safe_edit.split_of(i) == "test"}
    assert single.case_id.map(lambda i: safe_edit.split_of(i) == "test").all()
    assert set(single[single.editor == "c-rome-prefix"].case_id) == hard_test
    assert hard_test <= set(single[single.editor == "rome-2k"].case_id)
    assert set(rows.experiment) == {"single_edit_ppl50", "tune_clamp4", "tune_clamp12", "tune_memit-2k", "tune_rome_prune"}
    tuned = rows[rows.experiment.str.startswith("tune_")]
    cases = tuned.groupby("experiment").case_id.agg(frozenset)
    assert cases.nunique() == 1 and 1 <= len(cases.iloc[0]) <= 2  # every setting and editor: the same tune cases
    assert set(tuned[tuned.experiment == "tune_memit-2k"].editor) == {"memit-2k"}
    steps = pd.read_json(results / "safe_edit_sequential.jsonl", lines=True)
    kept = pd.read_json(results / "safe_edit_retention.jsonl", lines=True)
    n = len(set(steps.step)) - 1
    assert 1 <= n <= 3 and len(steps) == 3 * (n + 1) and len(kept) == 3 * n
    assert {p.name for p in (tmp_path / "figures").glob("06_*.png")} == {
        "06_single_tiny-llama.png", "06_sequential_tiny-llama.png"}
    run("quick", only=["06"], overrides=overrides, executed_dir=tmp_path / "executed")
    assert len(pd.read_json(results / "single_edit.jsonl", lines=True)) == len(rows)
    assert len(pd.read_json(results / "safe_edit_sequential.jsonl", lines=True)) == len(steps)
