"""hardcf.sweep_hardcf: the collapse cases of a sweep, by the one collapse rule, successful edits only."""
import json

import numpy as np
import pandas as pd

from editcollapse import data
from editcollapse.hardcases import hardcf


def test_sweep_hardcf_keeps_collapsed_successful_counterfact_edits(tmp_path):
    a, b, c, d = data.load_counterfact(n=4, seed=0)
    rows = pd.DataFrame([
        dict(case_id=a["case_id"], dataset="counterfact", ppl=5000.0, error=None),
        dict(case_id=b["case_id"], dataset="counterfact", ppl=50.0, error=None),
        dict(case_id=c["case_id"], dataset="counterfact", ppl=np.nan, error="EditError: refused"),
        dict(case_id=d["case_id"], dataset="counterfact", ppl=np.nan, error=None),  # a NaN perplexity collapsed
        dict(case_id=a["case_id"], dataset="zsre", ppl=9000.0, error=None),
    ]).assign(model="m", editor="rome", first_token=False)
    out = hardcf.sweep_hardcf(rows, tmp_path / "hard.json")
    assert [r["case_id"] for r in out] == [a["case_id"], d["case_id"]]  # highest perplexity first, NaN last
    assert json.loads((tmp_path / "hard.json").read_text())[0]["ppl"] == 5000.0
    assert hardcf.sweep_hardcf(rows[rows.ppl < 1000], None) == []
