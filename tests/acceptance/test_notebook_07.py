"""Notebook 07 (the models side by side) runs headless on two tiny models, one without BOS and one with it; a model
that cannot be loaded is skipped with its reason."""
import json

import pandas as pd
import pytest

from editcollapse.reproduce import run

pytestmark = pytest.mark.acceptance


def test_notebook_07_runs_on_two_models_and_skips_one_it_cannot_load(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITCOLLAPSE_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = tmp_path / "results"
    overrides = dict(models=["tiny-gpt2", "tiny-llama", "llama2-7b"], device="cpu", results_dir=str(results),
                     n_random=2, max_first_token=1, n_texts=4)
    run("quick", only=["07"], overrides=overrides, executed_dir=tmp_path / "executed")
    rows = pd.read_json(results / "single_edit.jsonl", lines=True)
    assert not rows.duplicated(["experiment", "model", "editor", "dataset", "case_id"]).any()
    rome = rows[rows.editor == "rome"]
    assert set(rome.model) == {"tiny-gpt2", "tiny-llama"}
    for model, g in rome.groupby("model"):
        assert 2 <= len(g) <= 3 and g.first_token.sum() >= 1  # 2 random cases and 1 first-token case
    crome = rows[rows.editor.isin(["c-rome", "c-rome-prefix"])]  # on ROME's collapse cases only
    collapsed = rome[rome.ppl > 1000]
    assert set(zip(crome.model, crome.case_id)) <= set(zip(collapsed.model, collapsed.case_id))
    assert (tmp_path / "figures" / "07_scale.png").exists()
    executed = json.loads((tmp_path / "executed" / "07_scale.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
    assert "llama2-7b: skipped, not loadable here" in text
    assert "| tiny-gpt2 | no |" in text and "| tiny-llama | yes |" in text and "| GPT-2-XL (paper) | no |" in text
