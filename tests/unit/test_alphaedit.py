"""AlphaEdit on tiny random models: the null-space property, its defining equation, the record of earlier edits."""
import pytest
import torch

from editcollapse.editors import AlphaEdit, EditError, EditRequest, EditStack, edited, live_edits
from editcollapse.editors import alphaedit
from editcollapse.models.loading import load_model
from editcollapse.models.stats import second_moment
from tests.device import DEVICE
from tests.fast import FAST_MEMIT
from tests.weights import identical, snapshot

from .test_memit import delta

ARCHS = ["tiny-gpt2", "tiny-gptj", "tiny-llama", "tiny-gemma3"]
REQS = [EditRequest("Twitter was acquired by", "Twitter", "Microsoft", "Elon Musk"),
        EditRequest("The capital of France is", "France", "Rome", "Paris"),
        EditRequest("Tokyo is located in", "Tokyo", "Spain", "Japan")]


def projection(lm, layer, hp):
    """P and its complement, by hand: eigenvectors of C below / above the threshold."""
    eigenvalues, U = torch.linalg.eigh(second_moment(lm, layer, n_tokens=hp.mom2_n_tokens).C)
    small = eigenvalues < hp.nullspace_threshold
    return U[:, small] @ U[:, small].T, U[:, ~small]


@pytest.mark.parametrize("bare_key", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_update_leaves_the_preserved_keys_outputs_unchanged(tiny_models, arch, bare_key):
    """ΔW k₀ = 0 for every k₀ spanned by C's eigenvectors above the threshold (the preserved knowledge),
    and ΔW solves its defining equation ΔW (K₁K₁ᵀP + L2·I) = R K₁ᵀ P; with `bare_key` ("alphaedit-2k")
    K₁ holds each fact's bare-prompt key too, and those are kept as preserved keys."""
    lm = tiny_models(arch)
    ed = AlphaEdit(bare_key=bare_key, hparams=FAST_MEMIT)
    hp = ed.hparams_for(lm)
    with edited(lm, REQS[:2], ed) as result:
        d = result.diagnostics
        assert result.editor == ed.name == ("alphaedit-2k" if bare_key else "alphaedit")
        assert all(len(k) == (4 if bare_key else 2) for k in d["preserved_keys"].values())
        for layer, row in zip(hp.layers, d["layer_diagnostics"]):
            P, K0 = projection(lm, layer, hp)
            assert 0 < K0.shape[1] < P.shape[0]  # a proper null space: the test is not vacuous
            assert row["null_dim"] == P.shape[0] - K0.shape[1]
            dW = delta(lm, result, layer)
            assert (dW @ K0).norm() < 1e-4 * dW.norm() * K0.norm()
            K, R = d["keys"][layer], d["residuals"][layer]
            M = K.T @ K @ P + hp.L2 * torch.eye(len(P), dtype=P.dtype)
            rhs = R.T @ K @ P
            # dW is read back from the float32 weights: each entry is off by up to half an ulp of W, 2⁻²⁴|W|,
            # which M can add up over a column (it matters on tiny-gemma3, whose mapped residuals are small)
            W = lm.model.get_parameter(lm.spec.module("mlp_out", layer) + ".weight").detach()
            storage = 2.0 ** -24 * W.abs().max().item() * M.abs().sum(0).max().item()
            torch.testing.assert_close(dW @ M, rhs, rtol=1e-4, atol=1e-4 * rhs.abs().max().item() + storage)


def test_sequential_edits_keep_the_keys_of_the_live_ones_and_undo_removes_them(tiny_models):
    lm = tiny_models("tiny-llama")
    ed = AlphaEdit(hparams=FAST_MEMIT)
    hp = ed.hparams_for(lm)
    before = snapshot(lm)
    with EditStack(lm) as stack:
        first = stack.apply(ed, REQS[0])
        assert all(x["n_preserved"] == 0 for x in first.diagnostics["layer_diagnostics"])
        second = stack.apply(ed, REQS[1:])
        d = second.diagnostics
        for layer in hp.layers:
            Kp = first.diagnostics["preserved_keys"][layer]
            torch.testing.assert_close(alphaedit.preserved_keys(lm, layer), torch.cat(
                [Kp, d["preserved_keys"][layer]]))
            # the second update solves the equation with K_p, the first edit's keys after it was applied
            P, _ = projection(lm, layer, hp)
            K = torch.cat([Kp, d["keys"][layer]])
            dW, R, K1 = delta(lm, second, layer), d["residuals"][layer], d["keys"][layer]
            lhs = dW @ (K.T @ K @ P + hp.L2 * torch.eye(len(P), dtype=P.dtype))
            torch.testing.assert_close(lhs, R.T @ K1 @ P, rtol=1e-4, atol=1e-4 * (R.T @ K1 @ P).abs().max().item())
        assert all(x["n_preserved"] == 1 for x in d["layer_diagnostics"])
        stack.undo_last()
        assert len(alphaedit.preserved_keys(lm, hp.layers[0])) == 1
        third = stack.apply(ed, REQS[2])
        assert all(x["n_preserved"] == 1 for x in third.diagnostics["layer_diagnostics"])
    assert alphaedit.preserved_keys(lm, hp.layers[0]) is None and not live_edits(lm)
    assert identical(lm, before)


def test_earlier_keys_restrain_the_update_on_them(tiny_models):
    """With K_p in the system, the new edit moves the earlier fact's key output less than without it."""
    lm = tiny_models("tiny-gpt2")
    ed = AlphaEdit(hparams=dict(FAST_MEMIT, L2=1e-3))
    with edited(lm, REQS[0], ed) as first:
        layer = first.diagnostics["layers"][0]
        kp = first.diagnostics["preserved_keys"][layer][0]
        with edited(lm, REQS[1], ed) as with_record:
            moved_with = (delta(lm, with_record, layer) @ kp).norm()
    with edited(lm, REQS[1], ed) as alone:
        moved_alone = (delta(lm, alone, layer) @ kp).norm()
    assert moved_with < 0.5 * moved_alone


def test_projection_is_cached_per_model_object_and_threshold(tiny_models):
    lm = tiny_models("tiny-llama")
    twin = load_model("tiny-llama", device=DEVICE)  # same name, another object
    P = alphaedit.null_space(lm, 1, 3000, 1e-4)
    assert alphaedit.null_space(lm, 1, 3000, 1e-4) is P
    assert alphaedit.null_space(lm, 1, 3000, 5e-5) is not P
    assert alphaedit.null_space(twin, 1, 3000, 1e-4) is not P
    torch.testing.assert_close(P @ P, P)  # a projection


def test_an_empty_null_space_is_refused_with_the_model_untouched(tiny_models):
    lm = tiny_models("tiny-gptj")
    before = snapshot(lm)
    with pytest.raises(EditError, match="null space of C at layer 0 is empty"):
        AlphaEdit(hparams=dict(FAST_MEMIT, nullspace_threshold=1e-12)).apply(lm, REQS[0])
    assert identical(lm, before)


def test_paper_presets_match_the_authors_files():
    P = alphaedit.PRESETS
    assert P["gpt2-xl"]["layers"] == (13, 14, 15, 16, 17) and P["gpt-j-6b"]["layers"] == (3, 4, 5, 6, 7, 8)
    assert all((P[m]["nullspace_threshold"], P[m]["L2"]) == (2e-2, 10.0) for m in ("gpt2-xl", "gpt-j-6b", "llama2-7b"))
    assert (P["llama2-7b"]["v_lr"], P["llama2-7b"]["layers"]) == (0.1, (4, 5, 6, 7, 8))


@pytest.mark.parametrize("hparams, message", [
    ({"nullspace_threshold": 0}, "nullspace_threshold must be a number > 0.0 \\(finite\\)"),
    ({"L2": -1}, "L2 must be a number > 0.0 \\(finite\\)"),
    ({"layers": [2, 1]}, "layers must be"),
    ({"mom2_update_weight": 1e4}, "unknown AlphaEditHyperParams setting"),
])
def test_bad_hyper_parameters_are_refused_when_the_editor_is_built(hparams, message):
    with pytest.raises(EditError, match=message):
        AlphaEdit(hparams=hparams)
