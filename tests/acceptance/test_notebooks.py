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

    pilot = pd.read_json(results / "01_pilot.jsonl", lines=True)
    assert len(pilot) == 4 and pilot.ppl.gt(1).all()
    single = pd.read_json(results / "02_single_edit.jsonl", lines=True)
    assert set(single.editor) == {"rome", "c-rome"} and len(single) == 2 * (3 + 2)
    hard = json.loads((results / "hardcf_tiny-llama.json").read_text())
    assert len(hard) == int((single[single.editor == "rome"].ppl > 1000).sum())
    assert len(list((tmp_path / "figures").glob("*.png"))) >= 4
    # a second run finds every case done and appends nothing
    run("quick", only=["02"], overrides=overrides, executed_dir=tmp_path / "executed")
    assert len(pd.read_json(results / "02_single_edit.jsonl", lines=True)) == len(single)
