"""The notebooks run end to end, headless, through the same runner as `make reproduce`.

A tiny random model keeps this fast; the pipeline (edits, perplexity, downstream, store, HardCF,
figures) is the one the quick profile runs on SmolLM2.
"""
import json

import pandas as pd
import pytest

from editcollapse.reproduce import run

pytestmark = pytest.mark.acceptance


def test_notebooks_run_headless(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITCOLLAPSE_FIGURES", str(tmp_path / "figures"))
    results = tmp_path / "results"
    overrides = dict(model="tiny-llama", device="cpu", results_dir=str(results), n_cases=4, n_downstream=3,
                     n_counterfact=3, n_zsre=2, n_first_token=0, editors=["rome", "c-rome"])
    timings = run("quick", only=["01", "02"], overrides=overrides, executed_dir=tmp_path / "executed")
    assert [stem for stem, _ in timings] == ["01_pilot_observation", "02_single_edit"]

    rows = pd.read_json(results / "single_edit.jsonl", lines=True)
    assert not rows.duplicated(["experiment", "model", "editor", "dataset", "case_id"]).any()
    assert (rows.editor == "c-rome").sum() == 3 + 2  # notebook 02's sample
    assert (rows.editor == "rome").sum() > 3 + 2  # plus notebook 01's first-token case(s)
    assert rows.ppl.gt(1).all() and rows.first_token.any()
    downstream = pd.read_json(results / "pilot_downstream_n3.jsonl", lines=True)
    assert {-1} < set(downstream.case_id) and set(downstream.task) == {"piqa", "hellaswag", "mmlu", "lambada", "nq", "squad2"}
    hard = json.loads((results / "hardcf_tiny-llama.json").read_text())
    assert len(hard) == int(((rows.editor == "rome") & (rows.dataset == "counterfact") & (rows.ppl > 1000)).sum())
    assert len(list((tmp_path / "figures").glob("*.png"))) >= 4
    # a second run finds every case done and appends nothing
    only_02 = {k: v for k, v in overrides.items() if k not in ("n_cases", "n_downstream")}
    run("quick", only=["02"], overrides=only_02, executed_dir=tmp_path / "executed")
    assert len(pd.read_json(results / "single_edit.jsonl", lines=True)) == len(rows)
