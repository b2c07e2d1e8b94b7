"""ROME / C-ROME on tiny random models of every architecture: the update's algebra, undo, errors."""
import pytest
import torch

from editcollapse.editors import ROME, EditError, EditRequest, edited, get_editor
from editcollapse.editors.rome import PRESETS
from editcollapse.editors import vstar
from editcollapse.editors.vstar import compute_v_star
from editcollapse.models.keys import context_templates, keys_and_values
from editcollapse.models.tokens import subject_last_index
from editcollapse.models.nethook import get_module
from transformers.pytorch_utils import Conv1D
from tests.fast import FAST_ROME
from tests.weights import snapshot, identical

ARCHS = ["tiny-gpt2", "tiny-gptj", "tiny-llama", "tiny-gemma3"]
REQ = EditRequest("Twitter was acquired by", "Twitter", "Microsoft", "Elon Musk")


def mlp(lm, hp):
    return lm.spec.module("mlp", hp.layer)


def mlp_out_weight(lm, layer):
    """W as [d_out, d_in] whatever the module stores (GPT-2's Conv1D stores the transpose), on the CPU beside
    the diagnostics."""
    module = get_module(lm.model, lm.spec.module("mlp_out", layer))
    return (module.weight.T if type(module).__name__ == "Conv1D" else module.weight).detach().cpu()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["mlp", "layer"])
@pytest.mark.parametrize("layer", [0, 1])
def test_cached_v_star_equals_full_forward(tiny_models, arch, kind, layer):
    """The cached optimisation (prefix cache, layers below `module` skipped) follows the papers' full forward,
    for v* at an MLP's output (ROME) and at a whole layer's output (MEMIT); layer 0 skips nothing below an MLP.
    (Not the last layer's output: there δ reaches no target position, its gradient is rounding noise.)"""
    assert_cached_v_star_equals_full(tiny_models(arch), FAST_ROME, kind, layer)


def assert_cached_v_star_equals_full(lm, hparams: dict, kind: str, layer: int) -> None:
    """v*, v_init and the loss curve of the cached optimisation equal the full forward's at `kind` of `layer`."""
    hp = ROME(hparams=hparams).hparams_for(lm)
    module = lm.spec.module(kind, layer)
    templates = context_templates(lm, hp.context_template_length_params, hp.seed)
    fast, v0_fast, curve_fast = compute_v_star(lm, REQ, templates, hp, module, fast=True)
    full, v0_full, curve_full = compute_v_star(lm, REQ, templates, hp, module, fast=False)
    torch.testing.assert_close(v0_fast, v0_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5)
    assert [round(c["loss"], 4) for c in curve_fast] == [round(c["loss"], 4) for c in curve_full]
    assert len(curve_fast) == hp.v_num_grad_steps  # every step ran (no early stop), so the cache was reused


@pytest.mark.skipif(not vstar._packing_available(), reason="this torch build has no oneDNN weight packing")
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_packed_linear_matches_the_module_and_its_input_gradient(kind):
    """The cached v* path's linear maps: W packed for oneDNN, forward and input gradient equal to the module's
    (nn.Linear with bias, GPT-2's Conv1D with its transposed weight); the pack is renewed when W changes."""
    torch.manual_seed(0)
    module = torch.nn.Linear(48, 70) if kind == "linear" else Conv1D(70, 48)
    module.requires_grad_(False)
    if kind == "conv1d":
        module.bias.normal_()
    x, g = torch.randn(3, 5, 48), torch.randn(3, 5, 70)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = vstar._PackedLinear(module)(x1), module(x2)
    torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-5)
    (out1 * g).sum().backward()
    (out2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        module.weight.mul_(2)  # an edit of W: the next pack is of the new W
    torch.testing.assert_close(vstar._PackedLinear(module)(x), module(x), rtol=1e-5, atol=1e-5)
    module.weight.data = -module.weight.data  # new data, the version unchanged
    torch.testing.assert_close(vstar._PackedLinear(module)(x), module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("consistent", [False, True])
def test_update_solves_its_defining_equation(tiny_models, arch, consistent):
    """W' k + b = v* for the edit's key k (k^u for ROME, k̄ for C-ROME); W' x = W x whenever uᵀx = 0."""
    lm = tiny_models(arch)
    before = snapshot(lm)
    layer = PRESETS[arch]["layer"]
    module = get_module(lm.model, lm.spec.module("mlp_out", layer))
    bias = module.bias.detach().cpu() if getattr(module, "bias", None) is not None else 0
    W0 = mlp_out_weight(lm, layer).clone()
    with edited(lm, REQ, ROME(consistent=consistent, hparams=FAST_ROME)) as result:
        d = result.diagnostics
        k = d["k_bar"] if consistent else d["k_u"]
        W1 = mlp_out_weight(lm, layer)
        torch.testing.assert_close(W1 @ k + bias, d["v_star"], rtol=1e-4, atol=1e-5)
        u = d["C_inv_k"]
        x = torch.randn_like(u)
        x -= (x @ u) / (u @ u) * u  # orthogonal to u
        torch.testing.assert_close(W1 @ x, W0 @ x, rtol=1e-4, atol=1e-5)
        assert d["denominator"] == pytest.approx((u @ k).item() / u.norm().item(), rel=1e-5)
        assert d["delta_norm"] == pytest.approx((W1 - W0).norm().item(), rel=1e-4)
    assert identical(lm, before)


def test_rome_update_is_exact_at_the_bare_prompt(tiny_models):
    """After ROME, the MLP output at the subject's last token of the bare prompt is v*."""
    lm = tiny_models("tiny-llama")
    with edited(lm, REQ, ROME(hparams=FAST_ROME)) as result:
        layer = result.diagnostics["layer"]
        idx = subject_last_index(lm, REQ.template(), REQ.subject)
        _, v = keys_and_values(lm, layer, [REQ.prompt], [idx])
        torch.testing.assert_close(v[0].cpu(), result.diagnostics["v_star"], rtol=1e-4, atol=1e-5)


def test_many_edit_undo_cycles_restore_bit_identical_weights(tiny_models):
    lm = tiny_models("tiny-gpt2")
    before = snapshot(lm)
    for i, name in enumerate(["rome", "c-rome", "c-rome-prefix"] * 3):
        req = EditRequest(f"Case {i}: Paris is the capital of", "Paris", ["Italy", "Spain", "Japan"][i % 3])
        result = get_editor(name, hparams=dict(FAST_ROME, v_num_grad_steps=2)).apply(lm, req)
        assert not identical(lm, before)
        result.undo()
        assert identical(lm, before)


def test_v_star_optimisation_lowers_the_target_nll(tiny_models):
    """Gradient steps on δ make the new target likelier (a random d=64 model caps p near 1/300:
    its tied embeddings are tiny, so only the NLL's fall, not p → 1, can be asked for)."""
    lm = tiny_models("tiny-llama")
    hp = ROME(hparams=dict(v_num_grad_steps=15, v_weight_decay=0.0, kl_factor=0.0, clamp_norm_factor=1e3)).hparams_for(lm)
    templates = context_templates(lm, hp.context_template_length_params, hp.seed)
    # the subject ends the prompt, so δ reaches the target's logits through the residual stream
    _, _, curve = compute_v_star(lm, EditRequest("I really like Twitter", "Twitter", "Microsoft"), templates, hp, mlp(lm, hp))
    assert curve[-1]["nll"] < curve[0]["nll"] - 1.0
    assert all(b["nll"] <= a["nll"] + 1e-6 for a, b in zip(curve, curve[1:]))


def test_context_templates_are_seeded(tiny_models):
    lm = tiny_models("tiny-llama")
    a = context_templates(lm, ((5, 10),), seed=1)
    assert a == context_templates(lm, ((5, 10),), seed=1)
    assert a != context_templates(lm, ((5, 10),), seed=2)
    assert a[0] == "{}" and len(a) == 11 and all(t.endswith(". {}") for t in a[1:])


@pytest.mark.parametrize("request_, message", [
    (EditRequest("Paris is the capital of", "London", "Italy"), "not in prompt"),
    (EditRequest("Paris is the capital of", "Paris", "  "), "empty target"),
    (EditRequest("Paris is the capital of", "Paris", "France", "France"), "equals the current answer"),
    (EditRequest("I saw London in", "Lond", "Rome"), "only part of a word"),
    (EditRequest("I saw Berlin in", "erlin", "Rome"), "only part of a word"),
    (EditRequest("I saw {}on in", "Lond", "Rome"), "tokenizes differently"),
    (EditRequest("I saw Lon{}n", "do", "Rome"), "does not start on a token boundary"),
    (EditRequest("Paris {is} the capital of", "Paris", "Italy"), "no other braces"),
    (EditRequest("Paris is the capital of", None, "Italy"), "subject must be a string"),
    (EditRequest("Paris is the capital of", "Paris", 5), "target_new must be a string"),
    (EditRequest(7, "Paris", "Italy"), "prompt must be a string"),
])
def test_bad_requests_are_refused_and_leave_the_model_untouched(tiny_models, request_, message):
    lm = tiny_models("tiny-llama")
    assert len(lm.tok(" London", add_special_tokens=False)["input_ids"]) == 1  # so "Lond" splits " London"
    before = snapshot(lm)
    with pytest.raises(EditError, match=message):
        ROME(hparams=FAST_ROME).apply(lm, request_)
    assert identical(lm, before)


def test_nan_in_the_optimisation_is_refused(tiny_models):
    """NaN in a layer ROME does not edit (2; it edits 1): the v* loss says the model was not finite before."""
    lm = tiny_models("tiny-gptj")
    w = get_module(lm.model, lm.spec.module("mlp_out", 2)).weight
    saved = w.detach().clone()
    hp = ROME(hparams=FAST_ROME).hparams_for(lm)
    context_templates(lm, hp.context_template_length_params, hp.seed)  # sampled while the model is sound
    try:
        with torch.no_grad():
            w[0, 0] = float("nan")
        before = snapshot(lm)
        with pytest.raises(EditError, match="non-finite v\\* loss at step 0 .*not finite before any change"):
            ROME(hparams=FAST_ROME).apply(lm, REQ)
        assert identical(lm, before, equal_nan=True)
        assert torch.equal(get_module(lm.model, lm.spec.module("mlp_out", 1)).weight,
                           before[lm.spec.module("mlp_out", 1) + ".weight"])
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_layer_out_of_range_is_refused(tiny_models):
    with pytest.raises(EditError, match="out of range"):
        ROME(hparams={"layer": 99}).apply(tiny_models("tiny-llama"), REQ)


def test_unknown_editor_name():
    with pytest.raises(ValueError, match="unknown editor"):
        get_editor("rome2")


def test_mom2_adjustment_uses_C_inverse_k_bar(tiny_models):
    """With mom2_adjustment, u = C⁻¹k̄ (C from stats.second_moment) and the update is still exact at k^u."""
    from editcollapse.models.stats import second_moment

    lm = tiny_models("tiny-llama")
    layer = PRESETS["tiny-llama"]["layer"]
    moment = second_moment(lm, layer, n_tokens=2000, use_cache=False)
    with edited(lm, REQ, ROME(hparams=dict(FAST_ROME, mom2_adjustment=True), stats=moment)) as result:
        d = result.diagnostics
        torch.testing.assert_close(d["C_inv_k"], moment.inv_apply(d["k_bar"]).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(moment.C.float() @ d["C_inv_k"], d["k_bar"], rtol=1e-3, atol=1e-4)
        W1 = mlp_out_weight(lm, layer)
        torch.testing.assert_close(W1 @ d["k_u"], d["v_star"], rtol=1e-4, atol=1e-5)


def test_paper_presets_match_the_papers_code():
    assert PRESETS["gpt2-xl"]["layer"] == 17 and PRESETS["gpt-j-6b"]["layer"] == 5
    llama = PRESETS["llama2-7b"]
    assert (llama["layer"], llama["v_num_grad_steps"], llama["v_weight_decay"]) == (5, 25, 1e-3)
    assert all(not p["mom2_adjustment"] for p in PRESETS.values())


@pytest.mark.parametrize("hparams, message", [
    ({"layer": "5"}, "layer must be an int"),
    ({"layer": None}, "layer must be an int"),
    ({"v_num_grad_steps": 0}, "v_num_grad_steps must be an int >= 1"),
    ({"kl_prompt": "is a"}, "kl_prompt"),
    ({"v_lr": -1}, "v_lr must be a number"),
    ({"context_template_length_params": [(5, 0)]}, "context_template_length_params"),
    ({"context_template_length_params": [(5, 3)]}, "count a positive multiple of 5"),
    ({"layr": 3}, "unknown ROMEHyperParams setting"),
])
def test_bad_hyper_parameters_are_refused_when_the_editor_is_built(hparams, message):
    with pytest.raises(EditError, match=message):
        ROME(hparams=hparams)


def test_stats_of_another_layer_are_refused(tiny_models):
    from editcollapse.models.stats import second_moment

    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    moment = second_moment(lm, 2, n_tokens=500, use_cache=False)
    with pytest.raises(EditError, match="stats are for tiny-llama layer 2"):
        ROME(hparams=dict(FAST_ROME, mom2_adjustment=True), stats=moment).apply(lm, REQ)
    assert identical(lm, before)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mom2", [False, True])
def test_two_key_update_maps_both_keys_to_v_star_and_leaves_their_C_complement(tiny_models, arch, mom2):
    """Two-key ROME: W' k^u + b = v* and W' k̄ + b = v*; W' x = W x whenever x is C-orthogonal to both keys
    (Kᵀ C⁻¹ x = 0, so the change is the least in the C-norm); the Gram matrix KᵀC⁻¹K is reported."""
    from editcollapse.models.stats import second_moment

    lm = tiny_models(arch)
    before = snapshot(lm)
    layer = PRESETS[arch]["layer"]
    moment = second_moment(lm, layer, n_tokens=2000, use_cache=False) if mom2 else None
    module = get_module(lm.model, lm.spec.module("mlp_out", layer))
    bias = module.bias.detach().cpu() if getattr(module, "bias", None) is not None else 0
    W0 = mlp_out_weight(lm, layer).clone()
    editor = ROME(two_keys=True, hparams=dict(FAST_ROME, mom2_adjustment=mom2), stats=moment)
    with edited(lm, REQ, editor) as result:
        d = result.diagnostics
        W1 = mlp_out_weight(lm, layer)
        for k in (d["k_u"], d["k_bar"]):
            torch.testing.assert_close(W1 @ k + bias, d["v_star"], rtol=1e-4, atol=1e-4)
        U = torch.stack([d["k_u"], d["k_bar"]], 1)
        if mom2:
            U = torch.stack([moment.inv_apply(U[:, 0]).float(), moment.inv_apply(U[:, 1]).float()], 1)
        Q, _ = torch.linalg.qr(U.double())
        x = torch.randn(U.shape[0], dtype=torch.float64)
        x = (x - Q @ (Q.T @ x)).float()  # Uᵀx = 0
        torch.testing.assert_close(W1 @ x, W0 @ x, rtol=1e-4, atol=1e-4)
        gram = torch.stack([d["k_u"], d["k_bar"]], 0) @ U
        eig = torch.linalg.eigvalsh(((gram + gram.T) / 2).double())
        assert d["gram_condition"] == pytest.approx((eig[-1] / eig[0]).item(), rel=1e-3)
        assert "denominator" not in d and result.editor == "rome-2k"
    assert identical(lm, before)


def test_least_change_update_with_one_key_is_rome_rank_one_update():
    """With K = [k] the least-change update is ROME's (v* − Wk)uᵀ/(uᵀk)."""
    from editcollapse.editors.rome import least_change_update, rank_one_update

    g = torch.Generator().manual_seed(0)
    v, Wk, k, u = (torch.randn(5, generator=g), torch.randn(5, generator=g), torch.randn(7, generator=g),
                   torch.randn(7, generator=g))
    two, _, gram = least_change_update(v, Wk[None], k[:, None], u[:, None])
    one, _, denominator = rank_one_update(v, Wk, k, u)
    torch.testing.assert_close(two, one)
    assert gram.item() == pytest.approx(denominator.item())


def test_two_key_rome_refuses_parallel_keys_and_other_key_options(tiny_models, monkeypatch):
    """k̄ = k^u (every template's key the bare prompt's) makes the Gram matrix singular: the edit is refused,
    the model untouched; two_keys with consistent or test_prefix is refused when the editor is built."""
    from editcollapse.editors import rome

    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    real = rome.edit_keys

    def same_keys(*args):
        K, V = real(*args)
        return K[:1].expand_as(K).clone(), V

    monkeypatch.setattr(rome, "edit_keys", same_keys)
    with pytest.raises(EditError, match="parallel"):
        ROME(two_keys=True, hparams=FAST_ROME).apply(lm, REQ)
    assert identical(lm, before)
    for option in (dict(consistent=True), dict(test_prefix=True)):
        with pytest.raises(EditError, match="two_keys"):
            ROME(two_keys=True, **option)


def test_first_position_weight_adds_the_scaled_first_position_moment_to_C(tiny_models):
    """first_position_weight λ: u = (C + λ (tr C / tr F) F)⁻¹ k̄ and the edit stays exact at both keys; without
    mom2_adjustment it is refused before any weight is written."""
    from editcollapse.models.stats import first_position_moment, second_moment

    lm = tiny_models("tiny-gpt2")
    before = snapshot(lm)
    layer = PRESETS["tiny-gpt2"]["layer"]
    C = second_moment(lm, layer, n_tokens=2000, use_cache=False)
    F = first_position_moment(lm, layer)
    editor = ROME(two_keys=True, stats=C, hparams=dict(FAST_ROME, mom2_adjustment=True, first_position_weight=2.0))
    with edited(lm, REQ, editor) as result:
        d = result.diagnostics
        M = C.C + 2.0 * C.C.trace() / F.C.trace() * F.C
        torch.testing.assert_close(d["C_inv_k"].double(), torch.linalg.solve(M, d["k_bar"].double()), rtol=1e-3, atol=1e-6)
        module = get_module(lm.model, lm.spec.module("mlp_out", layer))
        W1 = mlp_out_weight(lm, layer)
        for k in (d["k_u"], d["k_bar"]):
            torch.testing.assert_close(W1 @ k + module.bias.detach().cpu(), d["v_star"], rtol=1e-4, atol=1e-4)
    assert identical(lm, before)
    with pytest.raises(EditError, match="needs mom2_adjustment"):
        ROME(two_keys=True, hparams=dict(FAST_ROME, first_position_weight=1.0)).apply(lm, REQ)
    assert identical(lm, before)


def test_separate_values_map_each_key_to_its_own_v_star(tiny_models):
    """separate_values: W' k^u + b = v*_u (optimised on the bare prompt) and W' k̄ + b = v̄* (on the templates), two
    different vectors; refused without two_keys."""
    lm = tiny_models("tiny-gpt2")
    layer = PRESETS["tiny-gpt2"]["layer"]
    module = get_module(lm.model, lm.spec.module("mlp_out", layer))
    with edited(lm, REQ, ROME(two_keys=True, hparams=dict(FAST_ROME, separate_values=True))) as result:
        d = result.diagnostics
        W1 = mlp_out_weight(lm, layer)
        out_u, out_bar = (W1 @ k + module.bias.detach().cpu() for k in (d["k_u"], d["k_bar"]))
        torch.testing.assert_close(out_u, d["v_star"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out_bar, d["v_star_bar"], rtol=1e-4, atol=1e-4)
        assert (d["v_star_bar"] - d["v_star"]).norm() > 1e-3 * d["v_star"].norm()
    with pytest.raises(EditError, match="needs two_keys"):
        ROME(hparams=dict(FAST_ROME, separate_values=True)).apply(lm, REQ)


def test_restrain_update_maps_large_singular_values_through_prune_log():
    """σ ≥ σ_max(W) → σ_max(W) + log_α(σ/σ_max(W)); smaller singular values and every singular vector kept."""
    from editcollapse.editors.rome import restrain_update

    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 9, generator=g, dtype=torch.float64)
    top = torch.linalg.matrix_norm(W, ord=2).item()
    U, _ = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(9, 2, generator=g, dtype=torch.float64))
    S = torch.tensor([20 * top, 0.5 * top], dtype=torch.float64)
    restrained, before, w_top = restrain_update((U * S) @ V.T, W, 1.5)
    assert before == pytest.approx(20 * top) and w_top == pytest.approx(top)
    expected = (U * torch.tensor([top + torch.log(torch.tensor(20.0)).item() / torch.log(torch.tensor(1.5)).item(),
                                  0.5 * top], dtype=torch.float64)) @ V.T
    torch.testing.assert_close(restrained, expected)


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-llama"])
def test_prune_log_base_restrains_the_applied_update(tiny_models, arch):
    """With prune_log_base the weight change is `restrain_update` of the unrestrained edit's (same seed, same
    v*), GPT-2's transposed layout included, and undo restores the weights."""
    from editcollapse.editors.rome import restrain_update

    lm = tiny_models(arch)
    before = snapshot(lm)
    layer = PRESETS[arch]["layer"]
    W0 = mlp_out_weight(lm, layer).clone()
    with edited(lm, REQ, ROME(hparams=FAST_ROME)):
        delta = mlp_out_weight(lm, layer) - W0
    with edited(lm, REQ, ROME(hparams=dict(FAST_ROME, prune_log_base=1.01))) as result:
        restrained = mlp_out_weight(lm, layer) - W0
        d = result.diagnostics
    expected, top_delta, top_w = restrain_update(delta, W0, 1.01)
    assert top_delta > top_w  # the restraint acts
    assert d["unrestrained_spectral_norm"] == pytest.approx(top_delta, rel=1e-3)
    assert d["w_spectral_norm"] == pytest.approx(top_w, rel=1e-4)
    torch.testing.assert_close(restrained, expected, rtol=1e-3, atol=1e-5)
    assert identical(lm, before)
