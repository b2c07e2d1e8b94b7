"""The edit explorer: its session applies the edit it reports (one rank-one ΔW at the edited layer, the
target more likely), reports what the edited model really predicts and scores, replaces a previous edit
instead of stacking on it, and undo restores the exact weights and predictions."""
import pytest
import torch

from editcollapse import metrics, perplexity
from editcollapse.editors import EditRequest, get_editor
from editcollapse.widgets import ExplorerSession, _format, edit_explorer

PROMPT, SUBJECT, TARGET = "{} was acquired by", "Twitter", "Microsoft"
TEXT = PROMPT.format(SUBJECT)


def weights(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("name, editor", [("tiny-gpt2", "c-rome-prefix"), ("tiny-llama", "rome")])
def test_explorer_session_reports_the_edit_it_applied_and_undoes_it(tiny_models, name, editor):
    lm = tiny_models(name)
    w0 = weights(lm)
    top0, ppl0 = metrics.predict_next(lm, TEXT, k=5), perplexity.me_ppl(lm, 50, progress=False)["mean"]
    nll0 = metrics.target_nll(lm, [TEXT], [TARGET]).item()

    s = ExplorerSession(model_name=name, lm=lm)
    report = s.edit(PROMPT, SUBJECT, TARGET, editor=editor)
    w1 = weights(lm)
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
    assert report["collapsed"] == (report["ppl"] > perplexity.COLLAPSE_THRESHOLD)
    if editor == "c-rome-prefix":
        assert report["after_with_prefix"] == metrics.predict_next(
            lm, metrics.with_prefix(TEXT, report["prefix"]), k=5)
    assert f"{report['ppl_before']:.1f} -> {report['ppl']:.1f}" in _format(report)

    s.undo()
    assert all(torch.equal(w0[k], v) for k, v in lm.model.state_dict().items())  # bit-identical
    assert metrics.predict_next(lm, TEXT, k=5) == top0
    assert perplexity.me_ppl(lm, 50, progress=False)["mean"] == ppl0
    s.undo()  # nothing left to undo: a no-op
    assert all(torch.equal(w0[k], v) for k, v in lm.model.state_dict().items())


def test_a_new_edit_replaces_the_previous_one(tiny_models):
    lm = tiny_models("tiny-llama")
    w0 = weights(lm)
    with_b = get_editor("rome").apply(lm, EditRequest(prompt=PROMPT, subject=SUBJECT, target_new="Google"))
    w_b = weights(lm)
    with_b.undo()
    s = ExplorerSession(model_name="tiny-llama", lm=lm)
    s.edit(PROMPT, SUBJECT, TARGET)
    s.edit(PROMPT, SUBJECT, "Google")  # undoes the Microsoft edit first
    assert all(torch.equal(w_b[k], v) for k, v in lm.model.state_dict().items())
    s.undo()
    assert all(torch.equal(w0[k], v) for k, v in lm.model.state_dict().items())


def test_explorer_picks_counterfact_cases_and_builds():
    assert ExplorerSession.case(0)["subject"] == "Danielle Darrieux"
    with pytest.raises(KeyError, match="no CounterFact case 99999"):
        ExplorerSession.case(99999)
    box = edit_explorer(ExplorerSession(model_name="tiny-llama"))
    assert len(box.children) == 7
