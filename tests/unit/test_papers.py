"""The papers' numbers as data (each with its paper and table) and ours beside them, from hand-made rows."""
import math

import pandas as pd
import pytest

from editcollapse.results import papers


def test_every_number_has_its_source_and_one_key_per_model():
    ref = papers.reference()
    assert set(ref.model) == set(papers.MODELS) and ref.value.notna().all()
    assert ref.paper.isin([papers.BUTTERFLY, papers.FALL]).all() and ref.source.str.startswith("Sec. ").all()
    assert not ref.duplicated(["model"] + papers.KEY).any()
    gpt2 = papers.reference("gpt2-xl").set_index(papers.KEY).value
    assert gpt2[("median_denominator", "rome", "collapse")] == 0.04 and gpt2[("max_ppl", "c-rome", "collapse")] == 70.71
    assert papers.reference("llama2-7b").set_index(papers.KEY).value[("sequential_ppl_end", "rome", "hard")] == 1.19e11
    with pytest.raises(ValueError, match="the papers report"):
        papers.reference("smollm2-135m")
    assert papers.number("max_ppl", "rome", "collapse") == 26084.66
    assert papers.number("mean_ppl", "rome", "second2first", "gpt-j-6b") == 26978.14
    with pytest.raises(KeyError, match="no sequential_ppl_end of rome on hard for gpt2-xl"):
        papers.number("sequential_ppl_end", "rome", "hard")


def single_edit_rows():
    base = dict(experiment="e", model="m", dataset="counterfact", error=None)
    return pd.DataFrame([
        dict(base, editor="rome", case_id=1, ppl=5000.0, denominator=0.05, numerator_norm=30.0, efficacy=1.0),
        dict(base, editor="rome", case_id=2, ppl=1200.0, denominator=0.07, numerator_norm=20.0, efficacy=1.0),
        dict(base, editor="rome", case_id=3, ppl=150.0, denominator=5.0, numerator_norm=10.0, efficacy=0.0),
        dict(base, editor="c-rome", case_id=1, ppl=170.0, denominator=4.0, numerator_norm=9.0, efficacy=0.0),
        dict(base, editor="c-rome", case_id=2, ppl=160.0, denominator=4.0, numerator_norm=9.0, efficacy=1.0),
        dict(base, editor="c-rome-prefix", case_id=1, ppl=170.0, efficacy=0.0, prefixed_efficacy=1.0),
        dict(base, editor="c-rome", case_id=3, ppl=None, error="EditError: refused"),
        dict(base, editor="c-rome", case_id=9, ppl=180.0, efficacy=1.0),  # no ROME edit of case 9: no label
    ])


def test_single_edit_numbers_group_by_romes_label_of_the_case():
    table = papers.versus("gpt2-xl", single_edit=single_edit_rows()).set_index(papers.KEY)
    assert set(table.source.str.split(",").str[0]) == {papers.FALL}
    assert table.ours[("median_denominator", "rome", "collapse")] == pytest.approx(0.06)
    assert table.ours[("median_numerator", "rome", "normal")] == 10.0
    assert table.ours[("max_ppl", "rome", "collapse")] == 5000.0
    assert table.ours[("max_ppl", "c-rome", "collapse")] == 170.0
    assert table.ours[("efficacy", "c-rome", "collapse")] == 0.5
    assert table.ours[("prefixed_efficacy", "c-rome-prefix", "collapse")] == 1.0
    assert math.isnan(table.ours[("max_ppl", "c-rome", "normal")])  # its only normal case was refused
    assert math.isnan(table.ours[("max_ppl", "unedited", "")])  # not given
    assert table.paper[("max_ppl", "rome", "collapse")] == 26084.66
    assert not table.index.isin([("mean_ppl", "rome", "original")]).any()  # no Second2First rows given


def test_the_unedited_perplexity_sets_the_ratio_rule_and_its_own_row():
    table = papers.versus("gpt-j-6b", single_edit=single_edit_rows(), ppl_original=700.0).set_index(papers.KEY)
    assert table.ours[("max_ppl", "unedited", "")] == 700.0
    assert table.ours[("max_ppl", "rome", "collapse")] == 5000.0  # 1200 < 2 x 700: case 2 is normal now
    assert table.ours[("max_ppl", "rome", "normal")] == 1200.0 and table.paper[("max_ppl", "rome", "normal")] == 50.77


def test_second2first_and_sequential_numbers():
    s2f = pd.DataFrame(dict(mode=["original", "second2first"] * 2, ppl=[3000.0, 200.0, 5000.0, 400.0]))
    table = papers.versus("gpt2-xl", second2first=s2f).set_index(papers.KEY)
    assert table.ours[("mean_ppl", "rome", "original")] == 4000.0
    assert table.ours[("max_ppl", "rome", "second2first")] == 400.0
    assert table.paper[("mean_ppl", "rome", "second2first")] == 1397.87 and len(table) == 6
    steps = pd.DataFrame(dict(editor=["rome"] * 3 + ["memit"] * 2 + ["mend"] * 2, run=["hard"] * 3 + ["normal"] * 2
                              + ["random"] * 2, step=[0, 1, 2, 0, 1, 0, 1], ppl=[100.0, 2e3, 9e5, 100.0, 120.0, 100.0, 1e4]))
    table = papers.versus("llama2-7b", sequential=steps).set_index(papers.KEY)
    assert table.ours[("sequential_ppl_end", "rome", "hard")] == 9e5
    assert table.ours[("sequential_ppl_end", "memit", "normal")] == 120.0
    assert table.ours[("sequential_ppl_end", "unedited", "")] == 100.0
    assert math.isnan(table.ours[("sequential_ppl_end", "mend", "hard")])  # random runs have no paper number
    assert table.paper[("sequential_ppl_end", "memit", "hard")] == 6.85e4 and len(table) == 9
    assert papers.versus("gpt2-xl", sequential=steps).empty  # the paper's table is Llama-2-7b's only
    assert papers.versus("gpt2-xl").empty


def test_sequential_numbers_are_on_me_ppl_1k_where_the_run_measured_it():
    steps = pd.DataFrame(dict(editor=["rome"] * 3, run=["hard"] * 3, step=[0, 1, 2], ppl=[100.0, 2e3, 9e5],
                              ppl_1000=[120.0, float("nan"), 7e5]))
    table = papers.versus("llama2-7b", sequential=steps).set_index(papers.KEY)
    assert table.ours[("sequential_ppl_end", "rome", "hard")] == 7e5  # the paper's corpus, not ME-PPL_50's 9e5
    assert table.ours[("sequential_ppl_end", "unedited", "")] == 120.0


def test_sequential_lines_set_each_run_we_have_beside_the_papers_107_edits():
    from editcollapse.results.tables import collapse_steps

    steps = pd.DataFrame(dict(editor=["rome"] * 3 + ["memit"] * 2, run=["hard"] * 3 + ["normal"] * 2, step=[0, 1, 2, 0, 1],
                              ppl=[100.0, 2e3, 9e5, 100.0, 120.0], error=None, cum_rel_change=0.1, norm_growth=1.0,
                              cond_ratio=1.0))
    lines = papers.sequential_lines(papers.versus("llama2-7b", sequential=steps), collapse_steps(steps),
                                    {"memit": "MEMIT", "rome": "ROME", "mend": "MEND"})
    assert lines == ["| ME-PPL_1k after MEMIT's sequence of normal cases | 99.8 (107 edits) | 120 (1 edits) |",
                     "| ME-PPL_1k after ROME's sequence of HardCF cases | 1.19 × 10¹¹ (107 edits) | 9.0 × 10⁵ "
                     "(2 edits; collapsed at step 1) |"]
