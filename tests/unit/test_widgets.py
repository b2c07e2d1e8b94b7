"""The edit explorer: its session applies the edit it reports (one rank-one ΔW at the edited layer, the
target more likely), reports the guard's risk before any weight changes, what the edited model really
predicts and scores, progress through its phases, replaces a previous edit instead of stacking on it, and
undo restores the exact weights and predictions. The widget, driven by its own buttons, shows all of it."""
import re

import pytest
import torch

from editcollapse import guard

from editcollapse.eval import metrics, perplexity
from editcollapse.editors import EditError, EditRequest, get_editor
from editcollapse.results.labels import COLLAPSE_THRESHOLD, collapse_report
from editcollapse.widgets import (ExplorerSession, edit_explorer, predictions_html, prediction_chart, risk_html,
                                  verdict_html)
from tests.weights import identical, snapshot

PROMPT, SUBJECT, TARGET = "{} was acquired by", "Twitter", "Microsoft"
TEXT = PROMPT.format(SUBJECT)
REQUEST = EditRequest(prompt=PROMPT, subject=SUBJECT, target_new=TARGET)


@pytest.mark.parametrize("name, editor", [("tiny-gpt2", "c-rome-prefix"), ("tiny-llama", "rome")])
def test_explorer_session_reports_the_edit_it_applied_and_undoes_it(tiny_models, name, editor):
    lm = tiny_models(name)
    w0 = snapshot(lm)
    top0, ppl0 = metrics.predict_next(lm, TEXT, k=5), perplexity.me_ppl(lm, 50, progress=False)["mean"]
    nll0 = metrics.target_nll(lm, [TEXT], [TARGET]).item()
    score0 = guard.risk(lm, REQUEST, get_editor(editor))

    s = ExplorerSession(model_name=name, lm=lm)
    steps, risks = [], []

    def on_risk(risk):  # reported before the editor writes anything
        risks.append((risk, identical(lm, w0)))

    report = s.edit(PROMPT, SUBJECT, TARGET, editor=editor, progress=lambda *a: steps.append(a), on_risk=on_risk)
    w1 = snapshot(lm)
    changed = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert len(changed) == 1 and changed == list(s.result.saved)  # one tensor, the one the editor says it wrote
    assert changed[0].startswith(lm.spec.mlp_out.split("{}")[0])  # an MLP output projection W
    delta = (w1[changed[0]] - w0[changed[0]]).double()
    sv = torch.linalg.svdvals(delta)
    assert sv[1] < 1e-5 * sv[0]  # ROME's update is rank one (up to float32 rounding)
    assert report["delta_norm"] == pytest.approx(delta.norm().item(), rel=1e-4)
    assert report["rel_change"] == pytest.approx(delta.norm().item() / w0[changed[0]].double().norm().item(), rel=1e-4)
    assert metrics.target_nll(lm, [TEXT], [TARGET]).item() < nll0  # the new target became more likely
    # the report is what the model now does, against what it did before
    assert report["before"] == top0 and report["ppl_before"] == ppl0
    assert report["after"] == metrics.predict_next(lm, TEXT, k=5) != top0
    assert report["ppl"] == perplexity.me_ppl(lm, 50, progress=False)["mean"]
    assert report["ratio"] == report["ppl"] / report["ppl_before"]
    assert report["collapsed"] == (report["ppl"] > COLLAPSE_THRESHOLD == report["threshold"])
    if editor == "c-rome-prefix":
        assert report["after_with_prefix"] == metrics.predict_next(
            lm, metrics.with_prefix(TEXT, report["prefix"]), k=5)
    # the guard's score of the unedited model, handed over while the weights were still unedited
    threshold = guard.threshold_for(lm, get_editor(editor))
    assert report["risk"] == dict(editor=editor, score=score0, threshold=threshold, risky=score0 > threshold, note=None)
    assert risks == [(report["risk"], True)]
    # progress: every phase in order, the editor's own phases among them, ending at total
    done = [d for d, _, _ in steps]
    assert done == sorted(done) and steps[-1][0] == steps[-1][1] == 7
    texts = [t for _, _, t in steps]
    assert [t for t in texts if t.startswith(report["editor"] + ": ")][1:] == [
        f"{report['editor']}: {p}" for p in ("context templates", "reading the keys k^u, k̄", "optimising v*", "writing ΔW")]
    assert texts.index("measuring the unedited model's perplexity (ME-PPL_50)") < texts.index(
        "sampling the editor's context templates (once per model)") < texts.index(
        "guard: reading the keys k^u, k̄ (before the edit)") < texts.index(f"{report['editor']}: editing")
    assert set(report["seconds"]) == {"load", "ppl_before", "templates", "risk", "edit", "ppl", "total"}
    assert sum(v for k, v in report["seconds"].items() if k != "total") <= report["seconds"]["total"]
    assert texts[-2] == "measuring perplexity (ME-PPL_50)"

    assert s.undo() is report
    assert identical(lm, w0)  # bit-identical
    assert s.predictions(TEXT) == top0
    assert perplexity.me_ppl(lm, 50, progress=False)["mean"] == ppl0
    assert s.undo() is None  # nothing left to undo: a no-op
    assert identical(lm, w0)


def test_a_new_edit_replaces_the_previous_one(tiny_models):
    lm = tiny_models("tiny-llama")
    w0 = snapshot(lm)
    with_b = get_editor("rome").apply(lm, EditRequest(prompt=PROMPT, subject=SUBJECT, target_new="Google"))
    w_b = snapshot(lm)
    with_b.undo()
    s = ExplorerSession(model_name="tiny-llama", lm=lm)
    s.edit(PROMPT, SUBJECT, TARGET)
    s.edit(PROMPT, SUBJECT, "Google")  # undoes the Microsoft edit first
    assert identical(lm, w_b)
    s.undo()
    assert identical(lm, w0)


def test_check_risk_scores_the_unedited_model_and_says_when_it_cannot(tiny_models):
    lm = tiny_models("tiny-llama")
    w0 = snapshot(lm)
    s = ExplorerSession(model_name="tiny-llama", lm=lm)
    s.edit(PROMPT, SUBJECT, "Google")
    risk = s.check_risk(PROMPT, SUBJECT, TARGET, "c-rome")  # the live edit is undone first
    assert s.result is None and identical(lm, w0)
    assert risk["score"] == guard.risk(lm, REQUEST, get_editor("c-rome"))
    assert risk["risky"] == (risk["score"] > risk["threshold"])
    ft = s.check_risk(PROMPT, SUBJECT, TARGET, "ft-linf")
    assert ft["score"] is None and "no score for ft-linf" in ft["note"] and "no risk score" in risk_html(ft)
    with pytest.raises(EditError, match="subject 'Facebook' not in prompt"):
        s.check_risk(TEXT, "Facebook", TARGET)


def report_of(ppl, ppl_before=167.0, **kw):
    r = dict(model="m", editor="rome", text="Bay, which is located in", target_new="Italy",
             before=[(" Italy", 0.5), (" the", 0.25), (" a", 0.125), (" Spain", 0.0625), (" France", 0.03125)],
             after=[(" the", 0.75), (" Italy", 0.125), (" a", 0.0625), (",", 0.03125), (" and", 0.015625)],
             ppl_before=ppl_before, threshold=1000.0, denominator=0.0412, delta_norm=12.5, rel_change=0.31,
             **collapse_report(ppl, ppl_before))
    return {**r, **kw}


def test_rendering_makes_a_collapse_unmistakable_and_shows_what_was_measured():
    collapsed = verdict_html(report_of(30512.34))
    assert "COLLAPSED: perplexity 30,512.3 > threshold 1,000.0 (×182.71 the unedited 167.0)" in collapsed
    assert "#c62828" in collapsed  # a red banner
    healthy = verdict_html(report_of(170.0))
    assert "not collapsed: perplexity 170.0 ≤ threshold 1,000.0 (×1.02 the unedited 167.0)" in healthy
    assert "COLLAPSED" not in healthy
    risky = risk_html(dict(editor="rome", score=3.0, threshold=0.5422, risky=True, note=None))
    assert "HIGH COLLAPSE RISK" in risky and "= 3 > threshold 0.542" in risky and "uᵀk^u = 0.0498" in risky
    assert "low collapse risk" in risk_html(dict(editor="rome", score=-3.5, threshold=0.5422, risky=False, note=None))
    table = predictions_html(report_of(170.0))
    cells = re.findall(r"<td[^>]*>(.*?)</td>", table)
    assert cells[:4] == ["<code>&#x27; Italy&#x27;</code>", "0.500", "<code>&#x27; the&#x27;</code>", "0.750"]
    assert "denominator 0.0412" in table


def test_prediction_chart_draws_the_probabilities_and_marks_the_target():
    fig = prediction_chart(report_of(170.0))
    before, after = fig.axes
    for ax, preds in ((before, report_of(170.0)["before"]), (after, report_of(170.0)["after"])):
        bars = ax.patches
        assert [b.get_width() for b in bars] == [p for _, p in preds][::-1]  # best at the top
        assert [t.get_text() for t in ax.get_yticklabels()] == [repr(t) for t, _ in preds][::-1]
        red = [b for b in bars if b.get_facecolor()[:3] == pytest.approx((0xc6 / 255, 0x28 / 255, 0x28 / 255))]
        assert [b.get_width() for b in red] == [p for t, p in preds if t == " Italy"]


def find(box, name):
    """The widget with CSS class ec-<name> inside the explorer."""
    stack = [box]
    while stack:
        w = stack.pop()
        if f"ec-{name}" in getattr(w, "_dom_classes", ()):
            return w
        stack += list(getattr(w, "children", ()))
    raise LookupError(name)


def test_the_widget_driven_by_its_buttons_shows_risk_edit_and_undo(tiny_models):
    lm = tiny_models("tiny-llama")
    w0 = snapshot(lm)
    s = ExplorerSession(model_name="tiny-llama", lm=lm)
    box = edit_explorer(s)
    find(box, "case").value = 946
    find(box, "pick").click()
    case = ExplorerSession.case(946)
    assert [c.value for c in box.children[2:5]] == [case["prompt"], case["subject"], case["target_new"]]
    find(box, "check").click()
    risk = s.check_risk(case["prompt"], case["subject"], case["target_new"])
    assert f"{risk['score']:.3g}" in find(box, "risk").value and identical(lm, w0)
    find(box, "edit").click()
    status, verdict, table, chart = (find(box, n) for n in ("status", "verdict", "table", "chart"))
    assert status.value.startswith("edit applied in") and s.report is not None
    assert verdict.value == verdict_html(s.report) and table.value == predictions_html(s.report)
    assert chart.value[:8] == b"\x89PNG\r\n\x1a\n" and chart.layout.display is None
    assert not identical(lm, w0)
    assert not any(b.disabled for b in (find(box, n) for n in ("pick", "check", "edit", "undo")))
    find(box, "undo").click()
    assert identical(lm, w0) and status.value.startswith("edit undone: weights restored exactly")
    assert "as before the edit" in status.value and "NOT" not in status.value
    assert verdict.value == "" and chart.layout.display == "none"
    box.children[2].value, box.children[3].value = "Bay is in", "Nowhere"  # a subject not in the prompt: the
    # error is shown, the model stays unedited
    find(box, "edit").click()
    assert "EditError" in status.value and "Nowhere" in status.value and identical(lm, w0)


def test_explorer_picks_counterfact_cases_and_reports_unknown_ones():
    assert ExplorerSession.case(0)["subject"] == "Danielle Darrieux"
    with pytest.raises(KeyError, match="no CounterFact case 99999"):
        ExplorerSession.case(99999)
