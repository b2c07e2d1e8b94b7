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


def screen_plan():
    """A screen of 10 first-token cases (0-9) and 40 others (100-139): flagged 0-4 and 100-101, margin 5 and 102,
    the study's uniform samples 6-9 and 103-112 edited in the rest."""
    from editcollapse.hardcases import hardcf

    flagged, margin = [0, 1, 2, 3, 4, 100, 101], [5, 102]
    screened = pd.DataFrame(dict(case_id=list(range(10)) + list(range(100, 140)), error=None))
    screened["score"] = [5.0 if i in flagged else 0.9 if i in margin else -float(i % 50) - 1 for i in screened.case_id]
    random_ids = list(range(6, 10)) + list(range(103, 113))
    plan = hardcf.confirmation_plan(screened, 1.0, 2, random_ids)
    collapse = {0, 1, 2, 3, 100, 103}
    measured = pd.DataFrame([dict(case_id=i, label=i in collapse) for i in plan[plan.edit].case_id])
    return plan, measured


def test_the_screen_estimate_counts_first_token_cases_whole_and_scales_the_random_ones():
    from scipy.stats import beta

    plan, measured = screen_plan()
    assert dict(plan.stratum.value_counts()) == {"flagged": 7, "margin": 2, "rest": 41}
    est = scale.screen_estimate(plan, measured, set(range(10)), 1010)
    assert (est["screened"], est["flagged"], est["flagged_edited"], est["flagged_collapse"]) == (50, 7, 7, 5)
    # first-token part: 4 flagged collapses, none in the margin or in 0 of 4 rest edits; the other part: 1 flagged
    # collapse, 1 of 10 rest edits (37 rest cases) -> 1 + 3.7, times 1,000 other cases / 40 screened
    assert est["hardcf_estimate"] == pytest.approx(4 + (1 + 0.1 * 37) * 25)
    upper = 4 + beta.ppf(0.95, 1, 4) * 4 + (1 + beta.ppf(0.95, 2, 9) * 37) * 25
    assert est["hardcf_upper95"] == pytest.approx(upper)


def test_a_screen_gives_the_cross_model_tables_hardcf_size():
    plan, measured = screen_plan()
    s = study()
    s.screen = dict(scale.screen_estimate(plan, measured, set(range(10)), 1010), plan=plan, measured=measured,
                    threshold=1.0)
    table = scale.cross_model_table([s, study("b")])
    assert table.loc["m"].screen_flagged == 7 and math.isnan(table.loc["b"].screen_flagged)
    lines = scale.cross_model_lines(table)
    assert lines[2].endswith("| 122 (at most 396; the guard's screen of 50 cases: 7 flagged, 5 of 7 edited collapse) |")
    assert lines[3].endswith("| 57 (13–250; estimated from 19 random cases) |")
    assert scale.screen_line(s).startswith("m: the guard screened 50 cases") and "5 of 7 flagged edits" in scale.screen_line(s)
    assert scale.screen_line(study("b")) == "b: no guard screen"
