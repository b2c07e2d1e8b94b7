"""On SmolLM2-135M, the HardEdit filter keeps a known collapse case and drops a known normal one."""
import pandas as pd
import pytest

from editcollapse import data
from editcollapse.hardcases.hardedit import filter_candidates, write_hardedit

pytestmark = pytest.mark.integration


def test_filter_keeps_a_collapse_case_and_drops_a_normal_one(smollm2, tmp_path):
    cf = {c["case_id"]: c for c in data.load_counterfact()}
    # 946: "Bay, which is located in" -> Italy, subject the first token (ME-PPL_50 about 30,000 after ROME);
    # 536: "Vevo's owner" -> Winnipeg, a normal edit (about 166, the unedited model's 167)
    collapse, normal = cf[946], cf[536]
    rows = filter_candidates(smollm2, [normal, collapse], tmp_path)
    assert list(rows.case_id) == [946, 536] and set(rows.ranker) == {"guard"}  # the guard ranks 946 first
    assert rows.error.isna().all()
    kept = dict(zip(rows.case_id, rows.kept))
    assert kept == {946: True, 536: False}
    assert rows.set_index("case_id").ppl[946] > 1000 > rows.set_index("case_id").ppl[536]
    out = write_hardedit(tmp_path / "hardedit.json", rows, [dict(c, generator="counterfact", generation_prompt=None,
                                                                    generation_settings={}, rephrase_is_prompt=False)
                                                               for c in (normal, collapse)],
                            dict(model="smollm2-135m", settings=dict(editor="rome")))
    assert [c["case_id"] for c in out] == [946] and out[0]["ppl"] > 1000 and out[0]["model"] == "smollm2-135m"
    # resumable: a second run edits nothing and gives the same rows
    again = filter_candidates(smollm2, [normal, collapse], tmp_path)
    assert len(pd.read_json(tmp_path / "hardedit.jsonl", lines=True)) == 2
    assert again.ppl.tolist() == rows.ppl.tolist()
