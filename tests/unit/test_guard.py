"""The collapse guard on tiny random models: features equal the editor's, refusals leave the model untouched."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from editcollapse import guard
from editcollapse.cli import guard as guard_cli
from editcollapse.editors import FT, ROME, EditError, EditRequest, edited, live_edits
from editcollapse.editors.memit import MEMIT
from editcollapse.hardcases import hardcf
from editcollapse.models.keys import context_keys, edit_keys
from editcollapse.models.stats import second_moment
from tests.fast import FAST
from tests.weights import snapshot, identical

ARCHS = ["tiny-gpt2", "tiny-gptj", "tiny-llama", "tiny-gemma3"]
ALWAYS, NEVER = -1e9, 1e9  # thresholds below and above any finite score
REQS = [
    EditRequest("Twitter was acquired by", "Twitter", "Microsoft", "Elon Musk", case_id=1),
    EditRequest("The capital of France is", "France", "Rome", "Paris", case_id=2),
    EditRequest("I saw Berlin in", "erlin", "Rome", case_id=3),  # refused: part of a word
    EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French", case_id=4),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_keys_equal_the_editors_keys(tiny_models, arch):
    """Prefix cache + rows cut after the subject give k^u and every context key exactly as keys.edit_keys;
    a request the editor refuses gets an error and does not shift the others."""
    lm = tiny_models(arch)
    site = guard.key_site(lm, ROME(hparams=FAST))
    keys, positions, errors = context_keys(lm, REQS, site)
    assert [e is None for e in errors] == [True, True, False, True] and "part of a word" in errors[2]
    K = keys[site.layers[0]]
    assert K.shape[:2] == (3, len(site.contexts))
    for got, r in zip(K, [REQS[0], REQS[1], REQS[3]]):
        want, _ = edit_keys(lm, site.layers[0], r.template(), r.subject, site.contexts)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    bos = int(lm.spec.prepend_bos)
    n_twitter = len(lm.tok("Twitter", add_special_tokens=False)["input_ids"])
    assert positions[0] == (bos, bos + n_twitter - 1)  # the subject starts the prompt
    assert positions[3][0] == bos + len(lm.tok("The mother tongue of", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mom2", [False, True])
def test_denominator_two_ways_agrees(tiny_models, arch, mom2):
    """The guard's denominator, its raw form and cos(k^u, k̄), read before any edit, equal ROME's own diagnostics."""
    lm = tiny_models(arch)
    hp = dict(FAST, mom2_adjustment=mom2)
    layer = ROME(hparams=hp).hparams_for(lm).layer
    stats = second_moment(lm, layer, n_tokens=3000) if mom2 else None
    rome = ROME(hparams=hp, stats=stats)
    feats = guard.key_features(lm, [REQS[0], REQS[3]], rome)
    for row, r in zip(feats.itertuples(), [REQS[0], REQS[3]]):
        with edited(lm, r, rome) as result:
            d = result.diagnostics
        assert row.denominator == pytest.approx(d["denominator"], rel=1e-4)
        assert row.denominator_raw == pytest.approx(d["denominator_raw"], rel=1e-4)
        assert row.cosine == pytest.approx(d["k_u_k_bar_cosine"], rel=1e-5, abs=1e-6)
        assert row.score == pytest.approx(-math.log(d["denominator_raw"]), rel=1e-4)  # score: −log(uᵀk^u)


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-llama"])
def test_c_rome_keys_are_consistent_by_construction(tiny_models, arch):
    """C-ROME uses k̄ on both sides: its gain uᵀk̄ / uᵀk is exactly 1 and the guard reads its denominator
    (u/‖u‖)ᵀk̄ = ‖k̄‖ (C = I) as C-ROME reports it; the edit writes v* at k̄."""
    lm = tiny_models(arch)
    crome = ROME(consistent=True, hparams=FAST)
    row = guard.key_features(lm, [REQS[0]], crome).iloc[0]
    assert row.gain == pytest.approx(1.0, abs=1e-12)
    assert row.denominator == pytest.approx(row.k_bar_norm, rel=1e-6)
    with edited(lm, REQS[0], crome) as result:
        d = result.diagnostics
        assert row.denominator == pytest.approx(d["denominator"], rel=1e-4)
        K, V = edit_keys(lm, d["layer"], REQS[0].template(), REQS[0].subject, d["context_templates"])
        torch.testing.assert_close(K.mean(0).cpu(), d["k_bar"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(V.mean(0).cpu(), d["v_star"], rtol=1e-3, atol=1e-4)  # the mean value is v*


def test_score_is_monotone_in_the_denominator(tiny_models):
    """score_of = −log: strictly decreasing for positive denominators, +∞ at and below 0; moving k^u along u
    (which changes only the denominator, normalised or raw) moves the guard's score the other way."""
    d = np.array([-1.0, 0.0, 1e-6, 0.04, 0.5, 1.0, 9.6, 1e3])
    s = guard.score_of(d)
    assert np.isinf(s[:2]).all() and (np.diff(s[1:]) < 0).all()
    assert s[3] == pytest.approx(-math.log(0.04))
    lm = tiny_models("tiny-llama")
    site = guard.key_site(lm, ROME(hparams=FAST))
    K = context_keys(lm, [REQS[0]], site)[0][site.layers[0]][0].double()
    k_bar, k_u = K.mean(0), K[0]
    u_hat = k_bar / k_bar.norm()
    dens, scores = [], []
    for t in (-2.0, -0.5, 0.0, 0.5, 2.0):
        geom = guard.key_geometry(k_u[None] + t * u_hat, k_bar[None], k_bar[None])
        dens.append(geom["denominator"][0])
        scores.append(float(guard.rescore(pd.DataFrame(geom)).score[0]))
    assert np.all(np.diff(dens) > 0)
    finite = [s for d_, s in zip(dens, scores) if d_ > 0]
    assert np.all(np.diff(finite) < 0) and all(np.isinf(s) for d_, s in zip(dens, scores) if d_ <= 0)


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-gemma3"])
def test_guard_refuses_without_touching_the_model(tiny_models, arch):
    lm = tiny_models(arch)
    before = snapshot(lm)
    guarded = guard.Guarded(ROME(hparams=FAST), "refuse", threshold=ALWAYS)  # every request is risky
    with pytest.raises(EditError, match="refused, the model is unchanged"):
        guarded.apply(lm, REQS[0])
    assert identical(lm, before) and not live_edits(lm)
    with edited(lm, REQS[0], guard.Guarded(ROME(hparams=FAST), "refuse", threshold=NEVER)) as result:
        assert result.diagnostics["guard_action"] == "edit" and not result.diagnostics["guard_flagged"]
        assert not identical(lm, before)
    assert identical(lm, before)
    with pytest.raises(EditError, match="part of a word"):
        guarded.apply(lm, REQS[2])
    with pytest.raises(EditError, match="guard must be one of"):
        guard.Guarded(ROME(), "ignore")
    for fallback in ("c-rome", "rome-2k"):
        with pytest.raises(EditError, match="needs a ROME editor"):
            guard.Guarded(MEMIT(), "switch", fallback=fallback)


def test_guard_warns_or_switches(tiny_models):
    """warn: the ROME edit with a CollapseWarning; switch: two-key ROME's edit instead (same weights as two-key
    ROME alone), or C-ROME's with fallback="c-rome"."""
    lm = tiny_models("tiny-llama")
    with pytest.warns(guard.CollapseWarning, match="likely to collapse"):
        with edited(lm, REQS[0], guard.Guarded(ROME(hparams=FAST), "warn", threshold=ALWAYS)) as result:
            assert result.diagnostics["guard_action"] == "warned" and result.diagnostics["guard_editor"] == "rome"
    for fallback, alone in ((None, ROME(two_keys=True, hparams=FAST)), ("c-rome", ROME(consistent=True, hparams=FAST))):
        with edited(lm, REQS[0], guard.Guarded(ROME(hparams=FAST), "switch", threshold=ALWAYS,
                                               fallback=fallback)) as result:
            switched = snapshot(lm)
            assert result.diagnostics["guard_editor"] == alone.name and result.diagnostics["guard_action"] == "switched"
        with edited(lm, REQS[0], alone):
            assert identical(lm, switched)


def test_a_guarded_editor_reports_the_wrapped_editors_phases(tiny_models):
    """on_phase of a Guarded editor sees its own phase ("guard") and every phase of the editor it wraps."""
    lm, seen = tiny_models("tiny-llama"), []
    rome = ROME(hparams=FAST)
    guarded = guard.Guarded(rome, "refuse", threshold=NEVER)
    guarded.on_phase(lambda phase, started: seen.append((phase, started)))
    with edited(lm, REQS[0], guarded) as result:
        phases = {phase for phase, _ in seen}
        assert "guard" in phases and {"v_star", "update"} <= phases
        assert phases - {"guard"} == set(result.seconds) - {"guard", "total"}
    assert rome.phase_callbacks == ()  # the wrapped editor is left as it was


def test_prefix_switch_for_memit(tiny_models):
    """A MEMIT edit that the guard flags is made on the prompt behind one of MEMIT's context templates,
    which is also the result's test-time prefix."""
    lm = tiny_models("tiny-gpt2")
    memit = MEMIT(hparams=dict(v_num_grad_steps=2))
    before = snapshot(lm)
    with edited(lm, REQS[0], guard.Guarded(memit, "switch", threshold=ALWAYS)) as result:
        site = guard.key_site(lm, memit)
        assert result.test_prefix in site.contexts[1:]
        assert result.diagnostics["guard_prompts"] == [result.test_prefix.replace("{}", REQS[0].prompt)]
        assert result.diagnostics["guard_action"] == "switched"
    assert identical(lm, before)


def test_the_editor_says_where_its_keys_are(tiny_models):
    """ROME, C-ROME and MEMIT name their key site; an editor that is not key-based is refused with a clear error."""
    lm = tiny_models("tiny-gpt2")
    assert guard.key_site(lm, ROME(hparams=FAST)).consistent is False
    assert guard.key_site(lm, ROME(consistent=True, hparams=FAST)).consistent is True
    assert guard.key_site(lm, MEMIT()).layers == MEMIT().hparams_for(lm).layers
    with pytest.raises(EditError, match="has no key_site"):
        guard.Guarded(FT(), "refuse", threshold=ALWAYS).apply(lm, REQS[0])


def test_calibrate_and_evaluate_by_hand():
    scores, labels = [0.0, 1.0, 2.0, 3.0, 4.0], [0, 0, 1, 0, 1]
    t = guard.calibrate(scores, labels)  # F2: flag {2,3,4} (p 2/3, r 1) beats {4} (p 1, r 1/2)
    assert t == pytest.approx(1.5)
    m = guard.evaluate(scores, labels, t)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 0)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0
    assert m["auroc"] == pytest.approx(5 / 6)  # pairs (pos, neg) ranked right: 2 of 3 for 2.0, 3 of 3 for 4.0
    with pytest.raises(ValueError, match="no collapse case"):
        guard.calibrate([1.0, 2.0], [0, 0])
    split = guard.calibration_split(range(2000))
    assert 0.45 < split.mean() < 0.55 and (split == guard.calibration_split(range(2000))).all()


def test_confirmation_plan_and_recall_by_hand():
    screened = pd.DataFrame(dict(case_id=range(10), score=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0], error=None))
    plan = hardcf.confirmation_plan(screened, threshold=6.5, n_margin=2, random_ids=[7, 9])
    assert plan.set_index("case_id").stratum.to_dict() == {0: "flagged", 1: "flagged", 2: "flagged", 3: "margin",
                                                          4: "margin", 5: "rest", 6: "rest", 7: "rest", 8: "rest",
                                                          9: "rest"}
    assert sorted(plan[plan.edit].case_id) == [0, 1, 2, 3, 4, 7, 9]
    measured = pd.DataFrame(dict(case_id=[0, 1, 2, 3, 4, 7, 9], label=[True, True, False, True, False, True, False]))
    r = hardcf.recall_estimate(plan, measured)
    # caught 2; missed: 1 in the margin + (1 of 2 sampled) × 5 in the rest = 3.5
    assert r["caught"] == 2 and r["missed_estimate"] == pytest.approx(3.5)
    assert r["recall"] == pytest.approx(2 / 5.5) and r["precision"] == pytest.approx(2 / 3)
    assert r["recall_lower95"] < r["recall"]
    # model-based: the 3 cases not edited (5, 6, 8) add their fitted probabilities to the misses
    assert r["caught_model"] == 2 and 2 < r["missed_model"] < 5 and r["recall_model"] == pytest.approx(
        2 / (2 + r["missed_model"]))


def test_sweep_missing_reuses_edits_of_every_store(tiny_models, tmp_path):
    """A case edited into one of EDIT_STORES is not edited again into another; edit_rows reads them all."""
    from editcollapse import data
    from editcollapse.experiments.single import results_store

    lm = tiny_models("tiny-llama")
    cases = data.load_counterfact(n=2, seed=0)
    sweep = dict(experiment="single_edit_ppl50", ppl_size=50, editor_kwargs=dict(hparams=FAST))
    first = hardcf.sweep_missing(lm, "rome", cases[:1], results_store(tmp_path, "single_edit"), results_dir=tmp_path,
                                **sweep)
    second = hardcf.sweep_missing(lm, "rome", cases, results_store(tmp_path, "guard_confirm"), results_dir=tmp_path,
                                 **sweep)
    assert (first, second) == (1, 1)
    rows = hardcf.edit_rows(tmp_path)
    assert sorted(rows.case_id) == sorted(c["case_id"] for c in cases) and rows.error.isna().all()
    assert len(results_store(tmp_path, "guard_confirm").read()) == 1
    assert hardcf.sweep_missing(lm, "rome", cases, results_store(tmp_path, "guard_eval"), results_dir=tmp_path,
                               **sweep) == 0


@pytest.mark.parametrize("bad", [float("nan"), np.nan, np.float32("nan"), np.inf, -np.inf, "0.5", True, [0.5],
                                 torch.tensor(0.5)])
def test_a_threshold_must_be_a_finite_number(bad):
    """A NaN threshold flagged nothing (score > NaN is False): the guard was off. It is refused, as is any
    threshold that is not a finite number."""
    with pytest.raises(EditError, match="threshold must be a finite number"):
        guard.Guarded(ROME(), "refuse", threshold=bad)


def test_finite_thresholds_are_kept_as_floats():
    for given, kept in ((np.float32(0.5), 0.5), (np.int64(2), 2.0), (-3, -3.0)):
        t = guard.Guarded(ROME(), threshold=given).threshold
        assert type(t) is float and t == kept
    assert guard.Guarded(ROME()).threshold is None  # the model's calibrated threshold


def test_a_guarded_editor_is_not_guarded_twice():
    with pytest.raises(EditError, match="rome\\+guard-refuse is guarded already: wrap the bare editor once"):
        guard.Guarded(guard.Guarded(ROME()), "warn")


def test_a_score_that_is_not_a_number_is_flagged(tiny_models, monkeypatch):
    """Keys that give no score (NaN) are no evidence of safety: the request is refused, the model untouched."""
    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    monkeypatch.setattr(guard, "key_features", lambda lm, requests, **kw: pd.DataFrame(
        dict(case_id=[r.case_id for r in requests], error=None, denominator_raw=np.nan, score=np.nan)))
    with pytest.raises(EditError, match=r"score NaN \(no score\) against threshold 0.00\); refused, the model is "
                                        "unchanged"):
        guard.Guarded(ROME(hparams=FAST), "refuse", threshold=0.0).apply(lm, REQS[0])
    assert identical(lm, before) and not live_edits(lm)


def test_cli_writes_under_results_by_default(tiny_models, tmp_path, monkeypatch):
    """`python -m editcollapse.cli.guard` writes its summary under --results, never into the shipped data/hardcf."""
    from pathlib import Path

    from editcollapse import data, paths

    cf = data.load_counterfact(n=3, seed=0)
    monkeypatch.setattr(data, "load_counterfact", lambda n=None, seed=0: cf[:n] if n else list(cf))
    repo = lambda p: Path(p) if Path(p).is_absolute() else tmp_path / "repo" / p  # noqa: E731
    monkeypatch.setattr(paths, "in_repo", repo)
    monkeypatch.setattr(hardcf, "in_repo", repo)
    monkeypatch.setattr(guard_cli, "in_repo", repo)
    guard_cli.main(["--model", "tiny-llama", "--results", str(tmp_path / "results"), "--no-screen", "--n-first", "0",
                "--n-labelled", "1"])
    assert not (tmp_path / "repo").exists()
    summary = json.loads((tmp_path / "results" / "hardcf" / "tiny-llama.summary.json").read_text())
    assert summary["model"] == "tiny-llama"
