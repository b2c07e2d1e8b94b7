"""tables: the sweep query, collapse labels and the per-editor single-edit table, on hand-made rows."""
import math

import numpy as np
import pandas as pd
import pytest

from editcollapse.results.tables import label_cases, single_edit_table, sweep_rows


def rows():
    base = dict(experiment="single_edit_ppl50", model="m", error=None, efficacy=1.0, generalization=0.5,
                locality=1.0, rel_change=0.01, seconds_edit=1.0)
    return pd.DataFrame([
        dict(base, editor="rome", dataset="counterfact", case_id=1, ppl=5000.0, collapsed=True, rel_change=0.5),
        dict(base, editor="rome", dataset="counterfact", case_id=2, ppl=100.0, collapsed=False),
        dict(base, editor="rome", dataset="counterfact", case_id=3, ppl=None, collapsed=None, error="EditError: x"),
        dict(base, editor="c-rome", dataset="counterfact", case_id=1, ppl=120.0, collapsed=False, efficacy=0.0),
        dict(base, editor="c-rome", dataset="counterfact", case_id=2, ppl=110.0, collapsed=False),
        dict(base, editor="rome", dataset="zsre", case_id=1, ppl=90.0, collapsed=False),
        dict(base, editor="rome", dataset="counterfact", case_id=9, ppl=90.0, collapsed=False),  # not sampled
        dict(base, editor="memit", dataset="counterfact", case_id=1, ppl=90.0, collapsed=False),  # editor not asked
        dict(base, editor="rome", dataset="counterfact", case_id=1, ppl=90.0, collapsed=False, model="other"),
    ])


CASES = {"counterfact": [{"case_id": 1}, {"case_id": 2}, {"case_id": 3}], "zsre": [{"case_id": 1}]}


def test_sweep_rows_keeps_exactly_the_sample():
    got = sweep_rows(rows(), "single_edit_ppl50", "m", ["rome", "c-rome"], CASES)
    assert sorted(zip(got.editor, got.dataset, got.case_id)) == sorted(
        [("rome", "counterfact", 1), ("rome", "counterfact", 2), ("rome", "counterfact", 3),
         ("c-rome", "counterfact", 1), ("c-rome", "counterfact", 2), ("rome", "zsre", 1)])


def test_labels_follow_each_row_and_the_reference_editor():
    got = label_cases(sweep_rows(rows(), "single_edit_ppl50", "m", ["rome", "c-rome"], CASES))
    by = {(e, d, c): (case, ref) for e, d, c, case, ref in
          zip(got.editor, got.dataset, got.case_id, got.case, got.reference_case)}
    assert by[("rome", "counterfact", 1)] == ("collapse", "collapse")
    assert by[("c-rome", "counterfact", 1)] == ("normal", "collapse")  # C-ROME on ROME's collapse case
    assert by[("rome", "counterfact", 3)] == ("refused", "n/a")
    assert by[("c-rome", "counterfact", 2)] == ("normal", "normal")


def test_single_edit_table_counts_and_means():
    table = single_edit_table(sweep_rows(rows(), "single_edit_ppl50", "m", ["rome", "c-rome"], CASES))
    rome = table.loc[("rome", "counterfact")]
    assert (rome.edits, rome.refused, rome.collapsed) == (2, 1, 1)
    assert rome.collapse_rate == 0.5 and rome.max_ppl == 5000.0 and rome.median_ppl == 2550.0
    assert math.isclose(rome.median_rel_change, (0.5 + 0.01) / 2)
    c_rome = table.loc[("c-rome", "counterfact")]
    assert (c_rome.edits, c_rome.refused, c_rome.collapsed, c_rome.efficacy) == (2, 0, 0, 0.5)


def seq_rows():
    out = []
    for editor, run, ppls in [("rome", "hard", [100, 900, 5000, 7000]), ("rome", "normal", [100, 110, 120, 130]),
                              ("memit", "hard", [100, 300, 200, 1500])]:
        for step, ppl in enumerate(ppls):
            out.append(dict(experiment="sequential", model="m", editor=editor, run=run, step=step, ppl=ppl, error=None,
                            cum_rel_change=step * 0.1, norm_growth=1 + step * 0.01, cond_ratio=1 + step))
    out.append(dict(out[0], model="other"))
    return pd.DataFrame(out)


def test_collapse_steps_finds_the_first_step_over_the_threshold():
    from editcollapse.results.tables import collapse_steps, sequential_rows

    table = collapse_steps(sequential_rows(seq_rows(), "m", ["rome", "memit"], ["hard", "normal"]))
    assert table.loc[("rome", "hard")].first_collapse_step == 2
    assert math.isnan(table.loc[("rome", "normal")].first_collapse_step)
    assert table.loc[("memit", "hard")].first_collapse_step == 3
    assert (table.loc[("rome", "hard")].ppl_end, table.loc[("rome", "hard")].cond_ratio_end) == (7000, 4)


def test_checkpoint_table_holds_the_larger_perplexity_where_it_was_measured():
    from editcollapse.results.tables import checkpoint_table

    rows = seq_rows()
    assert checkpoint_table(rows).empty
    rows["ppl_1000"] = [r.ppl * 2 if r.step in (0, 3) else float("nan") for r in rows.itertuples()]
    table = checkpoint_table(rows[rows.model == "m"])
    assert list(table.columns) == [0, 3] and table.loc[("rome", "hard"), 3] == 2 * rows.ppl[
        (rows.editor == "rome") & (rows.run == "hard") & (rows.step == 3) & (rows.model == "m")].iloc[0]


def test_downstream_table_takes_each_runs_last_step_and_the_original_on_top():
    from editcollapse.results.tables import downstream_table

    ds = pd.DataFrame([dict(run="hard", editor="rome", step=3, task="piqa", metric="acc", value=0.5),
                       dict(run="hard", editor="rome", step=1, task="piqa", metric="acc", value=0.7),
                       dict(run="normal", editor="rome", step=3, task="piqa", metric="acc", value=0.68)])
    original = pd.DataFrame([dict(task="piqa", metric="acc", value=0.7)])
    table = downstream_table(ds, seq_rows(), original, ppl_original=100.0)
    assert table.index.tolist() == [("original", ""), ("hard", "rome"), ("normal", "rome")]
    assert table["piqa acc"].tolist() == [0.7, 0.5, 0.68]
    assert table.perplexity.tolist() == [100.0, 7000, 130]


def test_edits_of_cases_an_editor_was_trained_on_are_left_out():
    base = dict(rows().iloc[1])
    trained = pd.DataFrame([dict(base, editor="mend", case_id=1, efficacy=1.0, trained_on=True),
                            dict(base, editor="mend", case_id=2, efficacy=0.0, trained_on=False),
                            dict(base, editor="rome", case_id=2, efficacy=1.0, trained_on=False)])
    table = single_edit_table(trained)
    mend = table.loc[("mend", "counterfact")]
    assert (mend.edits, mend.efficacy, mend.trained_on_left_out) == (1, 0.0, 1)
    assert table.loc[("rome", "counterfact")].trained_on_left_out == 0


def test_nan_perplexity_counts_as_collapsed_and_the_threshold_is_a_parameter():
    from editcollapse.results.tables import collapse_steps, sequential_rows

    nan = dict(rows().iloc[1])
    table = single_edit_table(pd.DataFrame([dict(nan, ppl=float("nan")), dict(nan, case_id=5, ppl=150.0)]))
    assert table.loc[("rome", "counterfact")].collapsed == 1
    assert single_edit_table(rows(), threshold=95.0).loc[("rome", "counterfact")].collapsed == 2  # 5000 and 100
    seq = seq_rows()
    seq.loc[(seq.editor == "rome") & (seq.run == "normal") & (seq.step == 2), "ppl"] = float("nan")
    steps = collapse_steps(sequential_rows(seq, "m", ["rome"], ["normal"]))
    assert steps.loc[("rome", "normal")].first_collapse_step == 2
    assert collapse_steps(sequential_rows(seq, "m", ["memit"], ["hard"]), threshold=250).first_collapse_step.iloc[0] == 1


def test_sequential_rows_of_one_perplexity_size_from_a_store(tmp_path):
    from editcollapse.experiments.sequential import sequential_store
    from editcollapse.results.tables import sequential_rows

    store = sequential_store(tmp_path)
    for r in seq_rows().assign(ppl_size=50).to_dict("records")[:5]:
        store.append(r)
    store.append(dict(seq_rows().iloc[0], step=9, ppl_size=1000))
    got = sequential_rows(store, "m", ["rome"], ["hard", "normal"], ppl_size=50)
    assert list(zip(got.run, got.step)) == [("hard", 0), ("hard", 1), ("hard", 2), ("hard", 3), ("normal", 0)]
    assert len(sequential_rows(store, "m", ["rome"], ["hard"])) == 5


def test_the_sequential_figure_has_a_panel_per_run(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from editcollapse.results.plots import sequential_ppl
    from editcollapse.results.tables import sequential_rows

    steps = sequential_rows(seq_rows().assign(ppl_size=50), "m", ["rome", "memit"], ["hard", "normal"])
    fig = sequential_ppl(steps, ["hard", "normal", "random"], ["rome", "memit"], title="t", path=tmp_path / "f.png")
    assert [ax.get_title() for ax in fig.axes[:3]] == ["hard cases", "normal cases", "random cases"]
    assert fig.axes[0].get_yscale() == "log" and "50" in fig.axes[0].get_ylabel()
    assert len(fig.axes[0].get_lines()) >= 3 and (tmp_path / "f.png").stat().st_size > 0


def test_wilson_interval_on_hand_checked_numbers():
    from editcollapse.results.tables import wilson_interval

    # p = 1/2, n = 10, z = 1.96: centre 0.5, half-width 1.96/(1 + 0.3842)·sqrt(0.025 + 0.0096) = 0.2634
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # 3.8416 / 13.8416
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_mean_interval_is_a_t_interval_clipped_to_the_bounds():
    from editcollapse.results.tables import mean_interval

    # [0, 1, 1, 1]: mean 0.75, s = 0.5, se = 0.25, t(0.975, 3) = 3.1824
    assert mean_interval([0, 1, 1, 1]) == pytest.approx((0.75 - 0.7956, 0.75 + 0.7956), abs=1e-4)
    assert mean_interval([0, 1, 1, 1], bounds=(0, 1)) == (0, 1)
    # [0.2, 0.4]: mean 0.3, se 0.1, t(0.975, 1) = 12.706
    assert mean_interval([0.2, 0.4, float("nan")]) == pytest.approx((0.3 - 1.2706, 0.3 + 1.2706), abs=1e-4)
    assert all(math.isnan(x) for x in mean_interval([0.5]))


def test_single_edit_table_has_an_interval_for_each_rate_and_mean():
    table = single_edit_table(sweep_rows(rows(), "single_edit_ppl50", "m", ["rome", "c-rome"], CASES))
    rome = table.loc[("rome", "counterfact")]  # 1 of 2 collapse
    assert (rome.collapse_rate_lo, rome.collapse_rate_hi) == pytest.approx((0.0945, 0.9055), abs=1e-4)
    c_rome = table.loc[("c-rome", "counterfact")]  # efficacy 0 and 1: mean 0.5 ± 12.706·0.5, clipped to [0, 1]
    assert (c_rome.efficacy_lo, c_rome.efficacy_hi) == (0.0, 1.0)
    assert (c_rome.locality_lo, c_rome.locality_hi) == (1.0, 1.0)  # both 1.0: no spread
    assert math.isnan(table.loc[("rome", "zsre")].efficacy_lo)  # one edit: no interval
    cols = list(table.columns)
    assert cols[cols.index("collapse_rate"):cols.index("collapse_rate") + 3] == [
        "collapse_rate", "collapse_rate_lo", "collapse_rate_hi"]
    assert cols[cols.index("efficacy"):cols.index("efficacy") + 3] == ["efficacy", "efficacy_lo", "efficacy_hi"]


def test_single_edit_table_by_sample_counts_a_case_in_each_of_its_samples():
    got = sweep_rows(rows(), "single_edit_ppl50", "m", ["rome"], {"counterfact": CASES["counterfact"]})
    both = pd.concat([got.assign(sample="random"), got[got.case_id == 1].assign(sample="hardcf")])
    labelled = label_cases(both)  # case 1 twice: its reference label is still one value
    assert set(labelled[labelled.case_id == 1].reference_case) == {"collapse"}
    table = single_edit_table(labelled, by=("editor", "sample"))
    assert (table.loc[("rome", "hardcf")].edits, table.loc[("rome", "hardcf")].collapse_rate) == (1, 1.0)
    assert (table.loc[("rome", "random")].edits, table.loc[("rome", "random")].refused) == (2, 1)
    from editcollapse.results.tables import single_edit_lines

    line = single_edit_lines(table)[0]
    assert "1 of 1 edits collapse" in line and "95 % CI" in line and line.lstrip().startswith("rome on hardcf")


def test_bos_contrast_table_and_sentence():
    from editcollapse.results.tables import bos_contrast_summary, bos_contrast_table

    base = dict(experiment="e", error=None, efficacy=1.0, rel_change=0.01, seconds_edit=1.0, dataset="counterfact")
    r = [dict(base, model="nobos", editor="rome", sample="first-token", case_id=i, ppl=5000.0 if i < 8 else 100.0)
         for i in range(10)]
    r += [dict(base, model="bos", editor="rome", sample="first-token", case_id=i, ppl=100.0) for i in range(10)]
    r += [dict(base, model="bos", editor="rome", sample="random", case_id=i, ppl=100.0) for i in range(20, 25)]
    table = bos_contrast_table(pd.DataFrame(r), {"nobos": False, "bos": True})
    assert table.loc[("nobos", "rome", "first-token")].collapse_rate == 0.8
    assert table.loc[("bos", "rome", "first-token")][["bos", "collapsed", "edits"]].tolist() == [True, 0, 10]
    text = bos_contrast_summary(table)
    assert "rome on nobos (no BOS): 8 of 10 first-token edits collapse (80%, 95 % CI 49%–94%)" in text
    assert "0 of 10" in text and "holds" in text  # [0, 27.8 %] lies below [49 %, 94 %]


def test_downstream_change_is_paired_over_items_with_a_bootstrap_interval():
    from editcollapse.results.tables import downstream_change

    base = dict(editor="rome", run="hard", task="piqa", metric="acc")
    start, end = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 0, 1, 0, 0, 1, 0]
    rows = pd.DataFrame([dict(base, step=0, value=np.mean(start), items=start),
                         dict(base, step=85, value=np.mean(end), items=end),
                         dict(base, metric="perplexity", step=0, value=51.5, items=[-3.7, -0.6]),
                         dict(base, metric="perplexity", step=85, value=900.0, items=[-9.1, -8.8])])
    got = downstream_change(rows, n_boot=4000, seed=1)
    assert len(got) == 1  # perplexity's value is not the mean of its items: left out
    r = got.iloc[0]
    assert (r.n, r.step_first, r.step_last) == (10, 0, 85)
    assert r.change == pytest.approx(0.3 - 0.7)
    # paired: every resample's change is −(number of 1→0 items drawn)/10, so the interval lies in [−1, 0]
    assert -1 <= r.change_low < r.change < r.change_high <= 0
    same = downstream_change(pd.DataFrame([dict(base, step=0, value=0.5, items=[1, 0]),
                                           dict(base, step=9, value=0.5, items=[1, 0])]))
    assert (same.change_low.iloc[0], same.change_high.iloc[0]) == (0.0, 0.0)


def test_a_runs_downstream_interval_does_not_depend_on_the_other_runs():
    from editcollapse.results.tables import downstream_change

    start, end = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 0, 1, 0, 0, 1, 0]
    one = [dict(editor="rome", run="hard", task="piqa", metric="acc", step=s, value=np.mean(v), items=v)
           for s, v in [(0, start), (85, end)]]
    other = [dict(r, editor="c-rome") for r in one]  # sorts first: takes the shared stream's first draws
    alone = downstream_change(pd.DataFrame(one)).set_index("editor").loc["rome"]
    beside = downstream_change(pd.DataFrame(other + one)).set_index("editor").loc["rome"]
    assert (alone.change_low, alone.change_high) == (beside.change_low, beside.change_high)


def test_sequential_summary_puts_each_runs_collapse_checkpoints_and_downstream_change_in_one_row():
    from editcollapse.results.tables import sequential_summary, sequential_summary_lines

    steps = seq_rows()
    steps = steps[steps.model == "m"].assign(ppl_1000=lambda d: np.where(d.step.isin([0, 3]), d.ppl * 2, np.nan))
    start, end = [1, 1, 0, 1], [0, 1, 0, 0]
    downstream = pd.DataFrame([dict(editor="rome", run="hard", task="lambada", metric="acc", step=s, value=np.mean(v),
                                    items=v) for s, v in [(0, start), (3, end)]])
    summary = sequential_summary(steps, downstream)
    hard = summary.loc[("rome", "hard")]
    assert (hard.first_collapse_step, hard.ppl_1000_start, hard.ppl_1000_end, hard.ppl_1000_end_step) == (2, 200, 14000, 3)
    assert (hard["lambada n"], hard["lambada first"], hard["lambada last"]) == (4, 0.75, 0.25)
    assert math.isnan(summary.loc[("rome", "normal"), "lambada change"])  # no downstream rows for that run
    lines = sequential_summary_lines(summary, {"rome": "ROME", "memit": "MEMIT"}, {"hard": "hard"})
    assert [line.split(" | ")[0] for line in lines if line.startswith("| ROME") or line.startswith("| MEMIT")] == \
        ["| ROME, hard", "| MEMIT, hard", "| ROME, hard", "| MEMIT, hard"]  # the normal run is not asked for
    assert "| ROME, hard | 3 | **2** | 7,000 (7,000) | 200 → 14,000 |" in "\n".join(lines)
    assert "| ROME, hard | 0.75 → 0.25 (−0.50, " in "\n".join(lines)
