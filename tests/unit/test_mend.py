"""MEND on tiny random models: the update's algebra, training, checkpoints and their refusals."""
import json

import pytest
import torch

from editcollapse import data
from editcollapse.editors import MEND, EditError, EditRequest, edited
from editcollapse.editors.mend import (MENDCheckpoint, MENDNet, PRESETS, gradient_factors, held_out_cases, in_out,
                                       mlp_weights, train, validate)
from editcollapse.eval.scoring import pack, target_pairs
from editcollapse.models.nethook import get_module
from tests.weights import snapshot, identical

ARCHS = ["tiny-gpt2", "tiny-gptj", "tiny-llama", "tiny-gemma3"]
REQ = EditRequest("Twitter was acquired by", "Twitter", "Microsoft", "Elon Musk")
REQ2 = EditRequest("The capital of France is", "France", "Rome", "Paris")


def out_in(lm, module, t):
    """A weight (or its change) as [d_out, d_in] (GPT-2's Conv1D stores the transpose)."""
    return t.T if type(get_module(lm.model, module)).__name__ == "Conv1D" else t


@pytest.fixture(scope="module")
def trained(tiny_models):
    """A MEND checkpoint per tiny architecture, trained for a few seconds on 100 CounterFact cases."""
    cases = data.load_counterfact("train", n=100, seed=0)
    return {arch: train(tiny_models(arch), MEND().hparams_for(tiny_models(arch)), steps=20, cases=cases,
                        data_note="test", progress=False) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_the_update_is_a_sum_of_rank_one_outer_products_of_the_transformed_factors(tiny_models, trained, arch):
    """ΔW = −η Σ_i δ̃_i ũ_iᵀ over the N tokens of the edit, so rank ΔW ≤ N."""
    lm, ckpt = tiny_models(arch), trained[arch]
    b = pack(lm, target_pairs(lm, [REQ.prompt], [REQ.target_new]))
    factors, _ = gradient_factors(lm, ckpt.net.names, b)
    n_tokens = int(b.mask.sum())
    with edited(lm, REQ, MEND(checkpoint=ckpt)) as result:
        assert len(result.saved) == len(ckpt.net.names) == len(mlp_weights(lm, PRESETS[arch]["layers"]))
        for k, module in enumerate(ckpt.net.names):
            u, delta = factors[module]
            u_t, delta_t = ckpt.net.transform(module, u, delta)
            expected = -ckpt.net.edit_lrs[k] * sum(torch.outer(delta_t[i], u_t[i]) for i in range(n_tokens))
            name = module + ".weight"
            change = out_in(lm, module, lm.model.get_parameter(name).detach() - result.saved[name])
            torch.testing.assert_close(change, expected.detach(), rtol=1e-3, atol=1e-6)
            assert torch.linalg.matrix_rank(change) <= n_tokens < min(change.shape)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_untrained_mend_with_unit_normalisation_takes_a_plain_gradient_step(tiny_models, arch):
    """U = 0 makes g the identity; with μ = 0, σ = 1 the update is −η ∇W L, L = the target's mean NLL."""
    lm = tiny_models(arch)
    modules = mlp_weights(lm, (1, 2))
    net = MENDNet({m: in_out(get_module(lm.model, m)) for m in modules}, rank=8, n_hidden=1, edit_lr=1e-3)
    for g in net.g.values():
        g.count.fill_(2.0)
        g.u_m2.fill_(1.0)
        g.delta_m2.fill_(1.0)
    hp = dict(PRESETS[arch], layers=[1, 2], rank=8, n_hidden=1)
    ckpt = MENDCheckpoint(net, dict(model=lm.spec.name, hparams=hp, steps=0, created="now",
                                    shapes={m: list(s) for m, s in net.shapes.items()}))
    weights = [lm.model.get_parameter(m + ".weight") for m in modules]
    b = pack(lm, target_pairs(lm, [REQ.prompt], [REQ.target_new]))
    for w in weights:
        w.requires_grad_(True)
    try:
        logits = lm.model(input_ids=b.ids, attention_mask=b.mask).logits
        logp = torch.log_softmax(logits[0, b.cols], -1)[torch.arange(len(b.tokens)), b.tokens]
        grads = torch.autograd.grad(-logp.mean(), weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    with edited(lm, REQ, MEND(checkpoint=ckpt, hparams=dict(layers=[1, 2], rank=8))) as result:
        for w, g, module in zip(weights, grads, modules):
            change = w.detach() - result.saved[module + ".weight"]
            torch.testing.assert_close(change, -1e-3 * g, rtol=1e-3, atol=1e-8)
        assert result.diagnostics["mend_grad_cosine"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_a_batch_edit_is_the_sum_of_the_single_edits(tiny_models, trained, arch):
    """The loss is a sum over requests and g acts per token, so ΔW([a, b]) = ΔW(a) + ΔW(b) at the same weights."""
    lm, ed = tiny_models(arch), MEND(checkpoint=trained[arch])
    changes = []
    for requests in ([REQ], [REQ2], [REQ, REQ2]):
        with edited(lm, requests, ed) as result:
            changes.append({n: lm.model.get_parameter(n).detach() - w for n, w in result.saved.items()})
    for name, both in changes[2].items():
        torch.testing.assert_close(both, changes[0][name] + changes[1][name], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_the_edit_loss(tiny_models, arch):
    lm = tiny_models(arch)
    """The post-edit NLL of held-out cases (after their prompt and their rephrase) falls in 40 steps."""
    hp = MEND().hparams_for(lm)
    val = held_out_cases(6)
    ckpt = train(lm, hp, steps=40, cases=data.load_counterfact("train", n=200, seed=1), val_cases=val,
                 val_every=40, progress=False)
    first, last = [r for r in ckpt.curve if "val_l_edit" in r]
    assert (first["step"], last["step"]) == (0, 40) and len(ckpt.curve) == 42
    assert last["val_l_edit"] < first["val_l_edit"] - 0.03
    assert last == {**last, **validate(lm, ckpt.net, hp, val)}  # the curve's row is what the net does now


def test_the_checkpoint_saves_with_its_metadata_and_loads_the_same(tiny_models, trained, tmp_path):
    lm, ckpt = tiny_models("tiny-llama"), trained["tiny-llama"]
    folder = ckpt.save(tmp_path / "mend" / "tiny-llama")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["model"] == "tiny-llama" and meta["layers"] == [1, 2] and meta["steps"] == 20
    assert {"data", "created", "library", "final", "edit_lrs", "weights", "hparams"} <= set(meta)
    assert meta["library"].startswith("editcollapse ")
    assert len(json.loads((folder / "curve.json").read_text())) == 20
    changes = []
    for source in (ckpt, folder, tmp_path / "mend", {"tiny-llama": folder}):
        with edited(lm, REQ, MEND(checkpoint=source)) as result:
            changes.append({n: lm.model.get_parameter(n).detach() - w for n, w in result.saved.items()})
    for other in changes[1:]:
        assert all(torch.equal(other[n], changes[0][n]) for n in changes[0])


def test_a_missing_checkpoint_is_refused_with_how_to_make_it(tiny_models, tmp_path, monkeypatch):
    lm = tiny_models("tiny-gptj")
    before = snapshot(lm)
    monkeypatch.setenv("EDITCOLLAPSE_CACHE", str(tmp_path))
    for ed in (MEND(), MEND(checkpoint=tmp_path / "nowhere")):
        with pytest.raises(EditError, match=r"make train-mend MODEL=tiny-gptj"):
            ed.apply(lm, REQ)
    with pytest.raises(EditError, match=str(tmp_path / "mend" / "tiny-gptj")):
        MEND().apply(lm, REQ)
    assert identical(lm, before)


def test_a_checkpoint_for_another_model_or_other_layers_is_refused(tiny_models, trained):
    lm = tiny_models("tiny-gemma3")  # the same shapes as tiny-llama
    before = snapshot(lm)
    with pytest.raises(EditError, match="trained for tiny-llama, not tiny-gemma3"):
        MEND(checkpoint=trained["tiny-llama"]).apply(lm, REQ)
    with pytest.raises(EditError, match=r"layers=\[1, 2\].*layers=\(2,\)"):
        MEND(checkpoint=trained["tiny-gemma3"], hparams=dict(layers=[2])).apply(lm, REQ)
    with pytest.raises(EditError, match="rank=16.*rank=32"):
        MEND(checkpoint=trained["tiny-gemma3"], hparams=dict(rank=32)).apply(lm, REQ)
    assert identical(lm, before)


def test_a_checkpoint_trained_on_other_weights_of_the_model_is_refused(tiny_models, trained):
    """Keyed by what it depends on: a checkpoint records the weights it was trained on (issue 18, item 2)."""
    lm = tiny_models("tiny-gpt2")
    w = lm.model.get_parameter("transformer.h.1.mlp.c_fc.weight")
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(1.01)  # other weights for the same model name
    try:
        with pytest.raises(EditError, match="trained on other weights of tiny-gpt2"):
            MEND(checkpoint=trained["tiny-gpt2"]).apply(lm, REQ)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    with edited(lm, REQ, MEND(checkpoint=trained["tiny-gpt2"])):
        pass


def test_bad_settings_are_refused():
    for bad in (dict(layers=[2, 1]), dict(layers=[]), dict(rank=0), dict(lr=-1.0), dict(c_loc="x"), dict(steps=3)):
        with pytest.raises(EditError):
            MEND(hparams=bad)


def test_mend_knows_the_cases_it_was_trained_on(tiny_models):
    from editcollapse import data
    from editcollapse.editors import get_editor

    lm, mend = tiny_models("tiny-gpt2"), get_editor("mend")
    train, held = data.load_counterfact("train", n=1)[0], data.load_counterfact("val", n=1)[0]
    assert mend.trained_on(lm, train) and not mend.trained_on(lm, held)
    assert mend.trained_on(lm, data.load_zsre()[0]) and not mend.trained_on(lm, data.load_zsre()[950])
    assert not get_editor("rome").trained_on(lm, train)
