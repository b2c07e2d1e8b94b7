"""analysis.scale: the per-model summary, the HardCF estimate and the README's cross-model table, on hand-made rows."""
import math

import pandas as pd
import pytest

from editcollapse.analysis import scale


def study(model="m", bos=False, guard=None):
    rows = []
    for i in range(10):  # first-token cases: 4 of 10 collapse under ROME
        rows.append(dict(editor="rome", case_id=i, sample="first-token", first_token=True, collapsed=i < 4,
                         case="collapse" if i < 4 else "normal", denominator=0.01 if i < 4 else 5.0, ppl=9e3 if i < 4 else 120.0,
                         error=None, efficacy=1.0))
    for i in range(100, 120):  # random cases: 1 of 20 collapses, one of them is a first-token case (not counted twice)
        first = i == 119
        rows.append(dict(editor="rome", case_id=i, sample="random", first_token=first, collapsed=i == 100,
                         case="collapse" if i == 100 else "normal", denominator=0.02 if i == 100 else 8.0,
                         ppl=2e4 if i == 100 else 110.0, error=None, efficacy=1.0))
    for i in list(range(4)) + [100]:
        rows.append(dict(editor="c-rome", case_id=i, sample="x", first_token=i < 4, collapsed=False, case="collapse",
                         denominator=9.0, ppl=130.0 + i % 10, error=None, efficacy=0.0))
        rows.append(dict(editor="c-rome-prefix", case_id=i, sample="x", first_token=i < 4, collapsed=False,
                         case="collapse", denominator=9.0, ppl=125.0, error=None, efficacy=0.0, prefixed_efficacy=1.0))
    return scale.ModelStudy(model, bos, 100.0, 50, pd.DataFrame(rows), guard or {}, n_counterfact=1010,
                            n_first_available=10)


def test_hardcf_estimate_counts_first_token_collapses_and_scales_the_others_rate():
    est = scale.hardcf_estimate(study())
    assert (est["first_collapse"], est["other_n"], est["other_collapse"], est["complete"]) == (4, 19, 1, True)
    assert est["estimate"] == pytest.approx(4 + 1 / 19 * 1000)
    assert est["low"] < est["estimate"] < est["high"] and est["low"] > 4


def test_the_cross_model_table_has_each_number_with_its_n():
    guard = dict(own=dict(n=15, collapse=3, auroc=0.9, recall=1.0, precision=0.5, threshold=1.0),
                 transferred=dict(n=15, collapse=3, auroc=0.9, recall=0.67, precision=1.0, threshold=0.58))
    table = scale.cross_model_table([study(guard=guard), study("b", bos=True)])
    r = table.loc["m"]
    assert (r.first_collapse, r.first_n, r.first_rate) == (4, 10, 0.4)
    assert (r.den_collapse, r.den_collapse_n, r.den_normal_n) == (0.01, 5, 25)
    assert (r.crome_n, r.crome_max_ppl, r.crome_prefixed_efficacy) == (5, 133.0, 1.0)
    assert math.isnan(table.loc["b"].guard_own_auroc)
    lines = scale.cross_model_lines(table, {"m": "M-135M", "b": "B"})
    assert lines[2].startswith("| M-135M | no | 4 of 10 (40%, ") and "| 0.90 (n 15, 3 collapse) | 1.00 / 0.50, 0.67 / 1.00 |" in lines[2]
    assert "| 0.01 (n 5) / 8.00 (n 25) | 133 (n 5; 100) |" in lines[2]
    assert lines[3].startswith("| B | yes |") and "| – (n –, – collapse) |" in lines[3]
    assert lines[2].endswith("| 57 (13–250; estimated from 19 random cases) |")
    assert lines[-3] == "| GPT-2-XL (paper) | no | | 0.04 / 9.60 | 70.71 (68.77) | | | 77 |"
    assert len(lines) == 2 + 2 + 3


def test_a_shipped_hardcf_is_given_before_the_samples_estimate():
    table = scale.cross_model_table([study("smollm2-135m")])
    assert table.loc["smollm2-135m"].hardcf_shipped == 85  # data/hardcf/smollm2-135m.summary.json
    line = scale.cross_model_lines(table)[2]
    assert line.endswith("| 85 (the guard's screen of all 21,919, confirmed by edits); this sample: 57 (13–250; "
                         "estimated from 19 random cases) |")
