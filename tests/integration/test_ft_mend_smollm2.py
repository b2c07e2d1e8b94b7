"""FT-L∞ and MEND on the shipped SmolLM2: an edit takes, stays in its bounds, and undoes exactly.

MEND is trained here for a few steps (its update at the start of training is already a
normalised gradient step that moves the target); the cached checkpoint of `make train-mend`,
when there is one, is checked on held-out cases as well.
"""
import pytest
import torch

from editcollapse import data

from editcollapse.eval import metrics
from editcollapse.editors import FT, MEND, EditRequest, edited
from editcollapse.editors.mend import checkpoint_dir, held_out_cases, train
from tests.weights import identical, snapshot

pytestmark = pytest.mark.integration

CASE = EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def p_new_beats_true(lm, request):
    nll = metrics.target_nll(lm, [request.prompt] * 2, [request.target_new, request.target_true])
    return bool(nll[0] < nll[1])


def test_ft_linf_flips_a_counterfact_case_within_its_bound_and_undoes_exactly(smollm2):
    """Case 4643, "Sukhdev Thapar, a citizen of" India -> Finland (NLL 12.4 against 2.9 before the edit)."""
    before = snapshot(smollm2)
    request = EditRequest.from_case(next(c for c in data.load_counterfact("edit") if c["case_id"] == 4643))
    assert not p_new_beats_true(smollm2, request)
    with edited(smollm2, request, FT()) as result:
        assert p_new_beats_true(smollm2, request)
        (name,) = result.saved
        eps = result.diagnostics["linf_bound"]
        W, W0 = smollm2.model.get_parameter(name).detach(), result.saved[name]
        assert torch.all(W <= W0 + eps) and torch.all(W >= W0 - eps)
        assert result.diagnostics["ft_loss_final"] < result.diagnostics["ft_loss_first"]
    assert identical(smollm2, before)


def test_mend_trained_for_a_few_steps_edits_and_undoes_exactly(smollm2):
    before = snapshot(smollm2)
    hp = MEND().hparams_for(smollm2)
    ckpt = train(smollm2, hp, steps=4, cases=data.load_counterfact("train", n=50), progress=False)
    assert ckpt.meta["model"] == "smollm2-135m" and len(ckpt.curve) == 4
    with edited(smollm2, CASE, MEND(checkpoint=ckpt)) as result:
        d = result.diagnostics
        assert result.diagnostics["n_tensors"] == 3 * len(hp.layers)  # gate, up and down of each layer
        assert d["mend_nll_post"] < d["mend_nll_pre"] - 1.0
        assert p_new_beats_true(smollm2, CASE)
    assert identical(smollm2, before)


def test_the_cached_mend_checkpoint_edits_held_out_cases(smollm2):
    if not (checkpoint_dir("smollm2-135m") / "mend.pt").exists():
        pytest.skip(f"no trained MEND checkpoint in {checkpoint_dir('smollm2-135m')}: "
                    f"run `make train-mend MODEL=smollm2-135m` to check it")
    editor = MEND()
    for case in held_out_cases(3):
        with edited(smollm2, EditRequest.from_case(case), editor):
            assert metrics.edit_metrics(smollm2, case)["efficacy"] == 1.0
