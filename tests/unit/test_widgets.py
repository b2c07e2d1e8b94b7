"""The edit explorer: its session edits, reports and undoes; the widget tree builds."""
import torch

from editcollapse.widgets import ExplorerSession, _format, edit_explorer


def test_explorer_session_edit_report_and_undo(tiny_models):
    lm = tiny_models("tiny-gpt2")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    s = ExplorerSession(model_name="tiny-gpt2", lm=lm)
    report = s.edit("{} was acquired by", "Twitter", "Microsoft", editor="c-rome-prefix")
    assert {"before", "after", "after_with_prefix", "ppl", "ppl_before", "ratio", "collapsed", "denominator"} <= set(report)
    assert report["ratio"] == report["ppl"] / report["ppl_before"]
    assert report["before"] != report["after"] or report["delta_norm"] > 0
    assert "ME-PPL perplexity" in _format(report)
    s.undo()
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_explorer_picks_counterfact_cases_and_builds():
    assert ExplorerSession.case(0)["subject"] == "Danielle Darrieux"
    box = edit_explorer(ExplorerSession(model_name="tiny-llama"))
    assert len(box.children) == 7
