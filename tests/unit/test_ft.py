"""FT-L∞ on tiny random models: the L∞ bound holds exactly, the target NLL falls, one step is a hand computation."""
import pytest
import torch

from editcollapse.eval import metrics
from editcollapse.editors import FT, EditError, EditRequest, edited
from editcollapse.models.tokens import target_ids
from tests.weights import snapshot, identical

ARCHS = ["tiny-gpt2", "tiny-gptj", "tiny-llama", "tiny-gemma3"]
REQ = EditRequest("Twitter was acquired by", "Twitter", "Microsoft Windows", "Elon Musk")
REQ2 = EditRequest("The capital of France is", "France", "Rome", "Paris")


@pytest.mark.parametrize("arch", ARCHS)
def test_the_linf_bound_holds_exactly_and_binds(tiny_models, arch):
    lm = tiny_models(arch)
    eps = 1e-3
    hp = dict(num_steps=8, lr=1e-2, norm_constraint=eps, early_stop_loss=0.0)
    with edited(lm, REQ, FT(hparams=hp)) as result:
        (name,) = result.saved
        assert name == lm.spec.module("mlp_out", 1) + ".weight"
        W, W0 = lm.model.get_parameter(name).detach(), result.saved[name]
        assert torch.all(W <= W0 + eps) and torch.all(W >= W0 - eps)  # W ∈ [W₀ − ε, W₀ + ε], as clamped
        d = result.diagnostics
        assert d["linf_bound"] == eps and d["linf_delta"] == pytest.approx(eps, rel=1e-3)
        assert d["linf_at_bound"] > 0.5  # lr = 10 ε: most entries reach the wall
        assert d["ft_steps"] == 8 and d["ft_epochs"] == 8 and len(d["loss_curve"]) == 8
    with edited(lm, REQ, FT(hparams=dict(hp, norm_constraint=None))) as free:
        assert free.diagnostics["linf_delta"] > 5 * eps and "linf_bound" not in free.diagnostics


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("objective", ["prompt_last", "target_new"])
def test_fine_tuning_lowers_the_target_nll(tiny_models, arch, objective):
    lm = tiny_models(arch)
    before = snapshot(lm)
    nll_before = metrics.target_nll(lm, [REQ.prompt], [REQ.target_new]).item()
    with edited(lm, REQ, FT(hparams=dict(num_steps=20, objective=objective))) as result:
        d = result.diagnostics
        assert d["ft_loss_final"] < d["ft_loss_first"] - 0.3
        if objective == "target_new":  # the objective is the teacher-forced NLL that `metrics` computes
            assert d["ft_loss_first"] == pytest.approx(nll_before, rel=1e-4)
            assert metrics.target_nll(lm, [REQ.prompt], [REQ.target_new]).item() == pytest.approx(d["ft_loss_final"],
                                                                                                   rel=1e-4)
        else:  # the first target token is scored the same way by both
            first = lm.tok.decode(target_ids(lm, REQ.target_new)[:1]).strip()
            assert metrics.target_nll(lm, [REQ.prompt], [first]).item() < nll_before
    assert identical(lm, before)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_step_is_adams_first_step_on_the_prompt_last_loss(tiny_models, arch):
    """Adam's first step is lr·g/(|g| + 1e-8), g = ∇W −1/T Σ_t log p(t_t | prompt) at the prompt's last token."""
    lm = tiny_models(arch)
    lr = 1e-4
    name = lm.spec.module("mlp_out", 1) + ".weight"
    W = lm.model.get_parameter(name)
    tokens = target_ids(lm, REQ.target_new)
    assert len(tokens) >= 2  # every target token is scored at the same position
    W.requires_grad_(True)
    try:
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([lm.token_ids(REQ.prompt)], device=lm.device)).logits[0, -1], -1)
        (g,) = torch.autograd.grad(-logp[tokens].mean(), W)
    finally:
        W.requires_grad_(False)
    with edited(lm, REQ, FT(hparams=dict(num_steps=1, lr=lr, norm_constraint=1.0, early_stop_loss=0.0))) as result:
        delta = W.detach() - result.saved[name]
        torch.testing.assert_close(delta, -lr * g / (g.abs() + 1e-8), rtol=1e-3, atol=1e-2 * lr)


def test_a_batch_fine_tunes_every_request_in_chunks(tiny_models):
    lm = tiny_models("tiny-llama")
    hp = dict(num_steps=3, early_stop_loss=0.0)
    with edited(lm, [REQ, REQ2], FT(hparams=dict(hp, batch_size=1))) as one_by_one:
        assert one_by_one.diagnostics["ft_steps"] == 6 and one_by_one.requests == (REQ, REQ2)
    with edited(lm, [REQ, REQ2], FT(hparams=dict(hp, batch_size=2))) as together:
        assert together.diagnostics["ft_steps"] == 3
        nll = metrics.target_nll(lm, [REQ.prompt, REQ2.prompt], [REQ.target_new, REQ2.target_new])
    assert together.diagnostics["ft_loss_final"] == pytest.approx(nll.mean().item(), rel=0.5)  # prompt_last vs forced


def test_a_loss_below_the_early_stop_skips_every_step(tiny_models):
    lm = tiny_models("tiny-gpt2")
    with edited(lm, REQ, FT(hparams=dict(early_stop_loss=1e9))) as result:
        assert result.diagnostics["ft_steps"] == 0 and result.diagnostics["ft_epochs"] == 1
        assert result.diagnostics["delta_norm"] == 0.0


def test_bad_settings_are_refused(tiny_models):
    for bad in (dict(objective="sgd"), dict(norm_constraint=-1.0), dict(num_steps=0), dict(lr="fast"), dict(epochs=3)):
        with pytest.raises(EditError):
            FT(hparams=bad)
    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    with pytest.raises(EditError, match="layer 7 out of range"):
        FT(hparams=dict(layer=7)).apply(lm, REQ)
    assert identical(lm, before)
