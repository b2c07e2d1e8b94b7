"""Notebook 04 (C-ROME analysis and the collapse guard) runs headless on tiny models and reuses stored edits."""
import pandas as pd
import pytest

from editcollapse import load_model
from editcollapse.editors import get_editor
from editcollapse.experiments.single import quick_sample, results_store, single_edit_row
from editcollapse.reproduce import run

pytestmark = pytest.mark.acceptance

MODEL = "tiny-llama"
OVERRIDES = dict(model=MODEL, device="cpu", n_random=3, n_first_token=2, n_ppl=50, mom2_tokens=3000,
                 bos_model="tiny-gemma3", n_texts=4, n_bos_cases=1, c_tokens=3000, c_seq_lens=[32, 128],
                 first_shares=[0.1], n_c_cases=1, second2first_model="tiny-gpt2", n_second2first=1, guard_models=[])


def test_notebook_04_runs_and_a_rerun_edits_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITCOLLAPSE_FIGURES", str(tmp_path / "figures"))
    results = tmp_path / "results"
    # A tiny random model has no real collapse cases: two real ROME rows (one per C setting) of the
    # sample's cases are stored with a collapsed perplexity, as notebook 02's sweep would have found them.
    lm = load_model(MODEL, device="cpu")
    cases = quick_sample(lm, "counterfact", n_random=3, n_first_token=2, seed=0)
    store = results_store(results, "single_edit")
    for experiment, hparams in (("single_edit_ppl50", {}), ("single_edit_ppl50_mom2",
                                                           dict(mom2_adjustment=True, mom2_n_tokens=3000))):
        editor = get_editor("rome", hparams=hparams)
        for case in cases[:2]:
            row = single_edit_row(lm, editor, case, 50)
            row.update(ppl=5000.0, collapsed=True, ppl_ratio=5.0)  # seeded collapse
            store.append(dict(experiment=experiment, model=MODEL, editor="rome", **row))
    if hasattr(store, "close"):
        store.close()
    overrides = dict(OVERRIDES, results_dir=str(results))
    run("quick", only=["04"], overrides=overrides, executed_dir=tmp_path / "executed")
    rows = pd.read_json(results / "single_edit.jsonl", lines=True)
    assert not rows.duplicated(["experiment", "model", "editor", "dataset", "case_id"]).any()
    mine = rows[rows.model == MODEL]
    assert set(mine[mine.editor == "rome"].experiment) == {"single_edit_ppl50", "single_edit_ppl50_mom2"}
    assert set(mine[mine.editor == "c-rome-prefix"].case_id) == {c["case_id"] for c in cases[:2]}  # ROME's collapse cases
    assert len(rows[rows.model == f"{MODEL}+bos"]) == 1
    assert len(pd.read_json(results / "c_gathering.jsonl", lines=True)) == 2  # one collapse, one normal case
    assert {p.name for p in (tmp_path / "figures").glob("04_*.png")} >= {
        f"04_keys_pca_tsne_{MODEL}.png", f"04_first_position_keys_{MODEL}.png", f"04_position_norms_{MODEL}.png",
        f"04_denominators_{MODEL}.png", f"04_c_gathering_denominators_{MODEL}.png", f"04_c_gathering_ppl_{MODEL}.png"}
    run("quick", only=["04"], overrides=overrides, executed_dir=tmp_path / "executed")
    assert len(pd.read_json(results / "single_edit.jsonl", lines=True)) == len(rows)
