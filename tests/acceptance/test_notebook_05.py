"""Notebook 05 (HardEdit) runs headless on a tiny model: pattern, offline generation, filter, sequential validation."""
import json

import pandas as pd
import pytest

from editcollapse import data
from editcollapse.experiments.single import results_store
from editcollapse.reproduce import run

pytestmark = pytest.mark.acceptance


def test_notebook_05_runs_and_a_rerun_edits_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITCOLLAPSE_FIGURES", str(tmp_path / "figures"))
    results = tmp_path / "results"
    cf = data.load_counterfact(n=6, seed=3)
    # the tiny random model's HardCF: three single ROME edits marked collapsed (it has no real ones)
    store = results_store(results, "single_edit")
    for c in cf[:3]:
        store.append(dict({k: c[k] for k in ("case_id", "prompt", "subject", "target_new", "ground_truth")},
                          experiment="single_edit_ppl50", model="tiny-llama", editor="rome", dataset="counterfact",
                          collapsed=True, error=None, ppl=5000.0))
    store.close()
    hardedit = tmp_path / "hardedit_tiny.json"  # a shipped HardEdit for the sequential validation
    hardedit.write_text(json.dumps(cf[3:]))
    overrides = dict(model="tiny-llama", device="cpu", results_dir=str(results), editors=["rome", "c-rome"],
                     offline_calls=2, max_subject_tokens=2, n_filter=3, n_cases=2, hardedit_path=str(hardedit))
    run("quick", only=["05"], overrides=overrides, executed_dir=tmp_path / "executed")
    filtered = pd.read_json(results / "hardedit.jsonl", lines=True)
    assert len(filtered) == 3 and (filtered.experiment == "hardedit_ppl50").all() and filtered.error.isna().all()
    assert (filtered.case_id >= 10**8).all() and filtered.ppl.gt(1).all()
    steps = pd.read_json(results / "hardedit_sequential.jsonl", lines=True)
    assert not steps.duplicated(["experiment", "run", "model", "editor", "step"]).any()
    assert len(steps) == 2 * 2 * 3  # two editors, hardedit and normal runs, steps 0..2
    assert set(steps[steps.run == "hardedit"].case_id.dropna()) == {c["case_id"] for c in cf[3:5]}
    assert {p.name for p in (tmp_path / "figures").glob("05_*.png")} == {
        "05_pattern_tiny-llama.png", "05_yield_tiny-llama.png", "05_sequential_ppl_tiny-llama.png"}
    run("quick", only=["05"], overrides=overrides, executed_dir=tmp_path / "executed")
    assert len(pd.read_json(results / "hardedit.jsonl", lines=True)) == 3
    assert len(pd.read_json(results / "hardedit_sequential.jsonl", lines=True)) == len(steps)
