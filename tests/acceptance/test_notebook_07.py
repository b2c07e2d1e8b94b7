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
                     n_random=2, max_first_token=1, n_texts=4, n_screen=5, n_confirm=1, n_margin=1, n_spill=1)
    run("quick", only=["07"], overrides=overrides, executed_dir=tmp_path / "executed")
    rows = pd.read_json(results / "single_edit.jsonl", lines=True)
    assert not rows.duplicated(["experiment", "model", "editor", "dataset", "case_id"]).any()
    rome = rows[rows.editor == "rome"]
    assert set(rome.model) == {"tiny-gpt2", "tiny-llama"}
    screened = pd.read_json(results / "guard_screen.jsonl", lines=True)
    for model, g in rome.groupby("model"):
        # 2 random cases and 1 first-token case, then the screen's confirming edits: 1 flagged, 1 below the threshold
        assert 3 <= len(g) <= 5 and g.first_token.sum() >= 1
        keys = screened[screened.model == model]
        assert len(keys) >= 5 and not keys.duplicated("case_id").any()  # 5 random cases and every first-token one
        assert set(g.case_id) <= set(keys.case_id)
    crome = rows[rows.editor.isin(["c-rome", "c-rome-prefix"])]  # on ROME's collapse cases only
    collapsed = rome[rome.ppl > 1000]
    assert set(zip(crome.model, crome.case_id)) <= set(zip(collapsed.model, collapsed.case_id))
    assert (tmp_path / "figures" / "07_scale.png").exists()
    executed = json.loads((tmp_path / "executed" / "07_scale.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                   for c in executed["cells"] for o in c.get("outputs", []))
    assert "llama2-7b: skipped, not loadable here" in text
    assert "tiny-gpt2: the guard screened" in text and "tiny-llama: the guard screened" in text
    assert "mlp_share" in text and "layer_out" in text  # the edits' reach on unrelated text, per model
    assert "| tiny-gpt2 | no |" in text and "| tiny-llama | yes |" in text and "| GPT-2-XL (paper) | no |" in text
