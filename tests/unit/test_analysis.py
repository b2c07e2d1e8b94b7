"""Pilot statistics: grouping into original / normal / collapsed, bootstrap intervals over edits and
items, the normal-collapsed difference, and the rank correlation with its n, against hand values."""
import numpy as np
import pandas as pd
import pytest

from editcollapse.analysis import pilot


def rows(spec):
    """Downstream rows from {(case_id, ppl): {task: items}} with each task's headline metric."""
    out = []
    for (case_id, ppl), tasks in spec.items():
        for task, items in tasks.items():
            metric = pilot.HEADLINE[task]
            out.append(dict(task=task, metric=metric, value=float(np.mean(items)), n=len(items), items=items,
                            case_id=case_id, ppl=ppl))
            out.append(dict(task=task, metric="other", value=0.0, n=len(items), items=items, case_id=case_id, ppl=ppl))
    return pd.DataFrame(out)


def test_status_and_headline_rows():
    assert pilot.status(-1, 5e6) == "original"
    assert pilot.status(3, 1000.5) == "collapsed" and pilot.status(3, float("inf")) == "collapsed"
    assert pilot.status(3, 999.0) == "normal"
    picked = pilot.headline_rows(rows({(-1, 100.0): {"piqa": [1, 0]}, (7, 1e5): {"piqa": [0, 0]},
                                          (8, 120.0): {"lambada": [1, 1]}}))
    assert list(zip(picked.case_id, picked.metric, picked.group)) == [(-1, "acc", "original"), (7, "acc", "collapsed"),
                                                                      (8, "acc", "normal")]
    assert picked.log10_ppl.tolist() == pytest.approx([2.0, 5.0, np.log10(120.0)])


def test_pick_edits_takes_the_worst_collapses_and_a_seeded_sample_of_normal_edits():
    sweep = pd.DataFrame(dict(case_id=range(10), ppl=[50, 60, 70, 80, 90, 100, 2e3, 3e3, 5e4, 1e6]))
    picked = pilot.pick_edits(sweep, 2, seed=1)
    assert set(picked[picked.group == "collapsed"].case_id) == {8, 9}
    normal = set(picked[picked.group == "normal"].case_id)
    assert len(normal) == 2 and normal <= set(range(6))
    assert normal == set(pilot.pick_edits(sweep, 2, seed=1).query("group == 'normal'").case_id)
    assert {frozenset(pilot.pick_edits(sweep, 2, seed=s).query("group == 'normal'").case_id) for s in range(8)} \
        != {frozenset(normal)}  # other seeds draw other normal edits
    assert picked.ppl.is_monotonic_increasing
    few = pilot.pick_edits(sweep, 9, seed=0)
    assert (few.group == "collapsed").sum() == 4 and (few.group == "normal").sum() == 6


def test_group_score_by_hand():
    one = pilot.group_score([[1, 0, 1, 1]], "acc")
    assert one["value"] == 0.75 and one["lo"] <= 0.75 <= one["hi"] and (one["n_models"], one["n_items"]) == (1, 4)
    assert one["lo"] >= 0 and one["hi"] <= 1
    flat = pilot.group_score([[1, 1, 1], [1, 1, 1]], "acc")
    assert flat == dict(value=1.0, lo=1.0, hi=1.0, n_models=2, n_items=3)
    # two models, one always right and one always wrong: the model draw alone gives 0, 0.5 or 1
    split = pilot.group_score([[1] * 5, [0] * 5], "acc")
    assert split["value"] == 0.5 and split["lo"] == 0.0 and split["hi"] == 1.0
    # a perplexity from per-item log-likelihoods: exp(-mean ll)
    assert pilot.group_score([[-1.0, -3.0]], "perplexity")["value"] == pytest.approx(np.exp(2.0))


def test_the_interval_narrows_with_more_items_and_covers_the_truth():
    rng = np.random.default_rng(0)
    small = pilot.group_score([rng.binomial(1, 0.6, 50)], "acc")
    large = pilot.group_score([rng.binomial(1, 0.6, 2000)], "acc")
    assert large["hi"] - large["lo"] < (small["hi"] - small["lo"]) / 3
    assert large["lo"] < 0.6 < large["hi"]
    with pytest.raises(ValueError, match="models x items"):
        pilot.group_score([[]], "acc")


def test_group_table_and_difference():
    spec = {(-1, 100.0): {"piqa": [1, 1, 0, 1]},
            (1, 110.0): {"piqa": [1, 1, 0, 1]}, (2, 120.0): {"piqa": [1, 0, 0, 1]},
            (3, 5e3): {"piqa": [0, 0, 0, 0]}, (4, 6e4): {"piqa": [0, 1, 0, 0]}}
    picked = pilot.headline_rows(rows(spec))
    table = pilot.group_table(picked)
    assert list(table.group) == ["original", "normal", "collapsed"]
    assert table.value.tolist() == pytest.approx([0.75, 0.625, 0.125]) and (table.chance == 0.5).all()
    assert table.n_models.tolist() == [1, 2, 2]
    d = pilot.difference(picked, "piqa")
    assert d["difference"] == pytest.approx(0.5) and d["lo"] <= 0.5 <= d["hi"] and d["n_items"] == 4
    sure = pilot.headline_rows(rows({(1, 50.0): {"piqa": [1] * 6}, (2, 5e3): {"piqa": [0] * 6}}))
    assert pilot.difference(sure, "piqa") == dict(task="piqa", difference=1.0, lo=1.0, hi=1.0, n_a=1, n_b=1,
                                                     n_items=6)
    with pytest.raises(ValueError, match="both groups"):
        pilot.difference(pilot.headline_rows(rows({(1, 50.0): {"piqa": [1]}})), "piqa")
    uneven = pilot.headline_rows(rows({(1, 50.0): {"piqa": [1, 0]}, (2, 60.0): {"piqa": [1]}}))
    with pytest.raises(ValueError, match="different numbers of items"):
        pilot.group_table(uneven)


def test_correlation_only_where_defined_with_its_n():
    ppl = [100.0, 120.0, 2e3, 3e4, 5e5]
    spec = {(i - 1, p): {"piqa": [s], "lambada": [0.0], "hellaswag": [s]}
            for i, (p, s) in enumerate(zip(ppl, [0.9, 0.8, 0.6, 0.5, 0.3]))}
    corr = pilot.correlation(pilot.headline_rows(rows(spec))).set_index("task")
    assert corr.loc["piqa", "rho"] == pytest.approx(-1.0) and corr.loc["piqa", "n"] == 5
    assert corr.loc["piqa", "p"] < 0.05
    assert np.isnan(corr.loc["lambada", "rho"]) and "every model scores 0" in corr.loc["lambada", "note"]
    few = pilot.correlation(pilot.headline_rows(rows(dict(list(spec.items())[:3]))))
    assert few.rho.isna().all() and (few.note == "fewer than 5 models").all() and (few.n == 3).all()
