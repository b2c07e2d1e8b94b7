"""MEMIT on tiny random models of every architecture: the update's normal equations, the layer spread, batches."""
import weakref

import pytest
import torch

from editcollapse.editors import MEMIT, EditError, EditRequest, edited
from editcollapse.editors import memit
from editcollapse.models.keys import context_templates, edit_keys
from editcollapse.models.nethook import Trace, get_module
from editcollapse.models import stats
from editcollapse.models.stats import second_moment, second_moments
from editcollapse.models.tokens import subject_last_index
from tests.fast import FAST_MEMIT
from tests.weights import identical, snapshot

ARCHS = ["tiny-gpt2", "tiny-gptj", "tiny-llama", "tiny-gemma3"]
REQS = [EditRequest("Twitter was acquired by", "Twitter", "Microsoft", "Elon Musk"),
        EditRequest("The capital of France is", "France", "Rome", "Paris"),
        EditRequest("Tokyo is located in", "Tokyo", "Spain", "Japan")]


def W(lm, layer):
    """The MLP output projection of `layer` as [d_out, d_in] (GPT-2's Conv1D stores the transpose)."""
    module = get_module(lm.model, lm.spec.module("mlp_out", layer))
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def delta(lm, result, layer):
    name = lm.spec.module("mlp_out", layer) + ".weight"
    d = (lm.model.get_parameter(name) - result.saved[name]).detach().double().cpu()
    return d.T if type(get_module(lm.model, lm.spec.module("mlp_out", layer))).__name__ == "Conv1D" else d


def memit_key(lm, layer, request, templates):
    """MEMIT's compute_ks by hand: ½ the bare prompt's key + ½ the mean over the prefixed prompts."""
    K, _ = edit_keys(lm, layer, request.template(), request.subject, templates)
    return (K[0] / 2 + K[1:].mean(0) / 2).double().cpu()


def residual(lm, layer, request):
    """The output of block `layer` at the subject's last token of the bare prompt."""
    idx = subject_last_index(lm, request.template(), request.subject)
    with torch.no_grad(), Trace(lm.model, lm.spec.module("layer", layer), retain_output=True) as t:
        lm.model(**lm.encode([request.prompt]))
    return t.output[0, idx].double().cpu()


@pytest.mark.parametrize("arch", ARCHS)
def test_update_solves_the_normal_equations_at_every_layer(tiny_models, arch):
    """ΔW_l (λC + KKᵀ) = R_l Kᵀ for every layer, with K and R_l read independently where the model allows."""
    lm = tiny_models(arch)
    ed = MEMIT(hparams=FAST_MEMIT)
    hp = ed.hparams_for(lm)
    templates = context_templates(lm, hp.context_template_length_params, hp.seed)
    first, last = hp.layers[0], hp.layers[-1]
    k0 = torch.stack([memit_key(lm, first, r, templates) for r in REQS[:2]])
    z0 = torch.stack([residual(lm, last, r) for r in REQS[:2]])
    scale = memit.through_post_norm(lm, first, k0, torch.ones_like(z0))  # 1, or rms(W k)/g behind Gemma-3's norm
    with edited(lm, REQS[:2], ed) as result:
        d = result.diagnostics
        torch.testing.assert_close(d["keys"][first], k0, rtol=1e-5, atol=1e-6)
        # the first layer carries 1/|R| of the target residual z* − z₀
        torch.testing.assert_close(d["residuals"][first], scale * (d["v_star"] - z0) / len(hp.layers),
                                   rtol=1e-4, atol=1e-5)
        for layer in hp.layers:
            C = second_moment(lm, layer, n_tokens=hp.mom2_n_tokens).C
            K, R, dW = d["keys"][layer], d["residuals"][layer], delta(lm, result, layer)
            lhs = dW @ (hp.mom2_update_weight * C + K.T @ K)
            torch.testing.assert_close(lhs, R.T @ K, rtol=1e-4, atol=1e-4 * (R.T @ K).abs().max().item())
            assert torch.linalg.matrix_rank(dW, rtol=1e-3) == 2  # one direction per fact (float32 rounding aside)


def test_the_last_layer_takes_the_whole_remaining_residual(tiny_models):
    lm = tiny_models("tiny-llama")
    ed = MEMIT(hparams=dict(FAST_MEMIT, layers=[0, 1, 2]))
    with edited(lm, REQS[0], ed) as result:
        name = lm.spec.module("mlp_out", 2) + ".weight"
        edited_last = lm.model.get_parameter(name).detach().clone()
        with torch.no_grad():
            lm.model.get_parameter(name).copy_(result.saved[name])  # layers 0 and 1 edited, 2 not yet
            z = residual(lm, 2, REQS[0])
            lm.model.get_parameter(name).copy_(edited_last)
        torch.testing.assert_close(result.diagnostics["residuals"][2][0], result.diagnostics["v_star"][0] - z,
                                   rtol=1e-4, atol=1e-5)
        realised = [x["realised_fraction"] for x in result.diagnostics["layer_diagnostics"]]
        assert sum(realised) == pytest.approx(result.diagnostics["realised_fraction"], abs=1e-9)
        assert result.diagnostics["z_error_after"] < result.diagnostics["z_error"]


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_the_residual_is_mapped_through_a_norm_after_the_MLP(tiny_models, arch):
    """Adding the mapped change to the MLP output at a key adds r to the residual stream (to first order),
    for any r the MLP can write there (here: the change made by a small random change of its output).
    The tiny model's MLP output is small (mean(x²) ≈ 3ε): without ε in the mapped denominator the error
    is 12 %; with it, what is left (under 1 %) is the radial part ε/(mean(x²)+ε) of r that the map ignores."""
    lm = tiny_models(arch)
    layer = 1
    block = get_module(lm.model, lm.spec.module("layer", layer))
    post = getattr(block, "post_feedforward_layernorm", torch.nn.Identity())
    assert isinstance(post, torch.nn.Identity) == (arch == "tiny-llama")
    templates = ["{}", "The news today. {}", "In short, {}"]  # fixed: sampled ones differ between CPU and CUDA
    k = memit_key(lm, layer, REQS[0], templates)[None]  # on the CPU, as the diagnostics hold it
    x = k.float().to(lm.device) @ W(lm, layer).T
    v = 1e-3 * x.norm() * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(lm.device)
    with torch.no_grad():
        r = (post(x + v) - post(x)).double().cpu()
        moved = (post(x + memit.through_post_norm(lm, layer, k, r).float().to(lm.device)) - post(x)).double().cpu()
    assert (moved - r).norm() < 0.02 * r.norm(), (moved - r).norm() / r.norm()


@pytest.mark.parametrize("lam", [1e3, 1e-6])
def test_written_fraction_is_s_over_lambda_plus_s(tiny_models, lam):
    """For one fact ΔW k = r · s/(λ+s), s = kᵀC⁻¹k: a hand computation; λ → 0 writes the whole residual."""
    lm = tiny_models("tiny-gptj")
    ed = MEMIT(hparams=dict(FAST_MEMIT, mom2_update_weight=lam))
    hp = ed.hparams_for(lm)
    with edited(lm, REQS[2], ed) as result:
        d = result.diagnostics
        for row in d["layer_diagnostics"]:
            k = d["keys"][row["layer"]][0]
            s = k @ torch.linalg.solve(second_moment(lm, row["layer"], n_tokens=hp.mom2_n_tokens).C, k)
            assert row["written_fraction"] == pytest.approx((s / (lam + s)).item(), rel=1e-5)
            r = d["residuals"][row["layer"]][0]
            torch.testing.assert_close(delta(lm, result, row["layer"]) @ k, r * s / (lam + s), rtol=1e-4,
                                       atol=1e-5 * r.abs().max().item())
    if lam < 1:
        assert d["written_fraction"] == pytest.approx(1.0, abs=1e-4)


def test_a_batch_writes_each_fact_at_its_own_key(tiny_models):
    """With λ → 0, every layer writes each fact's residual exactly at that fact's key (ΔW K = R, rank 3)."""
    lm = tiny_models("tiny-gpt2")
    with edited(lm, REQS, MEMIT(hparams=dict(FAST_MEMIT, mom2_update_weight=1e-7))) as result:
        d = result.diagnostics
        assert d["n_requests"] == 3 and d["v_star"].shape[0] == 3 and len(d["loss_curves"]) == 3
        for layer in d["layers"]:
            K, R, dW = d["keys"][layer], d["residuals"][layer], delta(lm, result, layer)
            torch.testing.assert_close(K @ dW.T, R, rtol=1e-3, atol=1e-3 * R.abs().max().item())
            assert torch.linalg.matrix_rank(dW, rtol=1e-3) == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_bare_key_writes_the_residual_at_the_bare_prompts_key_too(tiny_models, arch):
    """memit-2k: K = [the template mean; the bare prompt's key], both rows asking for R_l. With λ → 0,
    ΔW k^u = ΔW k̄ = R_l at every layer, where MEMIT alone leaves ΔW k^u off R_l (unless k^u = k̄: GPT-J's
    first MLP reads the token embedding alone, its attention running beside it)."""
    lm = tiny_models(arch)
    request = REQS[0]
    hp = MEMIT(hparams=FAST_MEMIT).hparams_for(lm)
    templates = context_templates(lm, hp.context_template_length_params, hp.seed)
    misses = []
    for bare_key in (True, False):
        ed = MEMIT(bare_key=bare_key, hparams=dict(FAST_MEMIT, mom2_update_weight=1e-7))
        assert ed.name == ("memit-2k" if bare_key else "memit")
        with edited(lm, [request], ed) as result:
            d = result.diagnostics
            for layer in d["layers"]:
                K, R, dW = d["keys"][layer], d["residuals"][layer], delta(lm, result, layer)
                assert len(K) == (2 if bare_key else 1)
                written = K @ dW.T
                torch.testing.assert_close(written, R, rtol=1e-3, atol=1e-3 * R.abs().max().item())
                if layer == d["layers"][0]:  # the keys are read before any update: K_u is the bare prompt's own
                    k_u = edit_keys(lm, layer, request.template(), request.subject, templates)[0][0].double().cpu()
                    if bare_key:
                        torch.testing.assert_close(K[1], k_u, rtol=1e-5, atol=1e-6)
                        if arch != "tiny-gemma3":  # (behind Gemma-3's post-MLP norm each key's R is mapped on its own)
                            torch.testing.assert_close(R[1], R[0])
                        r_u = R[1]  # what k^u must write (z* and z are the same in both runs)
                    misses.append(((dW @ k_u) - r_u).norm() / r_u.norm())
                    apart = (k_u - K[0]).norm() > 1e-3 * k_u.norm()
    assert misses[0] < 1e-4 and (misses[1] > 100 * misses[0] or not apart)
    assert apart or arch == "tiny-gptj"


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_z_star_equals_the_papers_full_forward(tiny_models, arch):
    lm = tiny_models(arch)
    with edited(lm, REQS[0], MEMIT(hparams=FAST_MEMIT)) as fast:
        pass
    with edited(lm, REQS[0], MEMIT(hparams=FAST_MEMIT, fast=False)) as full:
        pass
    torch.testing.assert_close(fast.diagnostics["v_star"], full.diagnostics["v_star"], rtol=1e-4, atol=1e-5)


def test_C_is_read_once_per_layer_and_its_factor_reused(tiny_models, monkeypatch):
    lm = tiny_models("tiny-llama")
    calls = []
    monkeypatch.setattr(stats, "_PER_MODEL", weakref.WeakKeyDictionary())
    monkeypatch.setattr(stats, "second_moments",
                        lambda lm, layers, *a, **kw: calls.append(list(layers)) or second_moments(lm, layers, *a, **kw))
    ed = MEMIT(hparams=FAST_MEMIT)
    for r in REQS[:2]:
        with edited(lm, r, ed):
            pass
    layers = ed.hparams_for(lm).layers
    assert calls == [list(layers)]  # all the layers in one call (one pass over the corpus where not cached)
    factors = [stats._PER_MODEL[lm.model][layer, 3000]._chol for layer in layers]
    with edited(lm, REQS[2], ed):
        pass
    assert all(stats._PER_MODEL[lm.model][layer, 3000]._chol is f for layer, f in zip(layers, factors))


def test_singular_C_is_refused_with_the_model_untouched(tiny_models):
    lm = tiny_models("tiny-gpt2")
    before = snapshot(lm)
    with pytest.raises(EditError, match="not positive definite"):
        MEMIT(hparams=dict(FAST_MEMIT, mom2_n_tokens=50)).apply(lm, REQS[0])  # 50 keys in 256 dimensions
    assert identical(lm, before)


def test_layers_out_of_range_are_refused(tiny_models):
    with pytest.raises(EditError, match="layer 3 out of range"):
        MEMIT(hparams=dict(FAST_MEMIT, layers=[1, 3])).apply(tiny_models("tiny-llama"), REQS[0])


def test_paper_presets_match_the_authors_files():
    P = memit.PRESETS
    assert P["gpt2-xl"]["layers"] == (13, 14, 15, 16, 17) and P["gpt2-xl"]["mom2_update_weight"] == 20000
    assert P["gpt-j-6b"]["layers"] == (3, 4, 5, 6, 7, 8) and P["gpt-j-6b"]["mom2_update_weight"] == 15000
    llama = P["llama2-7b"]
    assert (llama["layers"], llama["mom2_update_weight"], llama["clamp_norm_factor"], llama["v_weight_decay"]) == \
        ((4, 5, 6, 7, 8), 15000, 4.0, 1e-3)
    assert memit.MEMITHyperParams(**P["gpt2-xl"]).context_template_length_params == ((10, 5),)


@pytest.mark.parametrize("hparams, message", [
    ({"layers": "5"}, "layers must be"),
    ({"layers": []}, "layers must be"),
    ({"layers": [5, 4]}, "increasing"),
    ({"layers": [4, 4]}, "distinct"),
    ({"layers": [-1, 0]}, "layers must be"),
    ({"layers": [1.0, 2]}, "layers must be"),
    ({"mom2_update_weight": 0}, "mom2_update_weight must be a number > 0.0 \\(finite\\)"),
    ({"mom2_update_weight": "1e4"}, "mom2_update_weight"),
    ({"mom2_update_weight": float("nan")}, "mom2_update_weight"),
    ({"mom2_update_weight": float("inf")}, "mom2_update_weight"),
    ({"mom2_n_tokens": 0}, "mom2_n_tokens must be an int >= 1"),
    ({"context_template_length_params": [(10, 3)]}, "multiple of 5"),
    ({"v_lr": -1}, "v_lr must be a number"),
    ({"nullspace_threshold": 1e-2}, "unknown MEMITHyperParams setting"),
])
def test_bad_hyper_parameters_are_refused_when_the_editor_is_built(hparams, message):
    with pytest.raises(EditError, match=message):
        MEMIT(hparams=hparams)
