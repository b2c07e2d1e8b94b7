"""Key-space analysis helpers on tiny random models: projections, position norms, C variants, Second2First."""
import numpy as np
import pandas as pd
import pytest
import torch

from editcollapse import data, guard

from editcollapse.analysis import keyspace
from editcollapse.editors import ROME, EditRequest, edited
from editcollapse.models.nethook import Trace
from tests.fast import FAST
from tests.weights import identical, snapshot

TEXTS = ["The cat sat on the mat and looked at the door.", "Paris is the capital of France.",
         "A short line", "Numbers like 1 2 3 follow each other in order here."]


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_project_shapes_and_labels(method):
    rng = np.random.default_rng(0)
    labels = pd.DataFrame(dict(case_id=range(12), case=["collapse"] * 4 + ["normal"] * 8,
                               first_token=[True] * 5 + [False] * 7))
    vectors = {k: rng.normal(size=(12, 16)) for k in ("k_u", "k_bar", "C_inv_k")}
    out = keyspace.project(vectors, labels, method=method)
    assert len(out) == 36 and {"x", "y", "kind", "case_id", "case", "first_token"} <= set(out.columns)
    assert list(out.kind.unique()) == ["k_u", "k_bar", "C_inv_k"]
    for kind in vectors:  # each kind's rows carry the labels in the input order
        part = out[out.kind == kind].reset_index(drop=True)
        pd.testing.assert_frame_equal(part[labels.columns], labels)
    assert np.isfinite(out[["x", "y"]].to_numpy()).all()
    if method == "pca":
        assert len(out.attrs["explained_variance_ratio"]) == 2
    with pytest.raises(ValueError, match="one vector per label row"):
        keyspace.project({"k_u": rng.normal(size=(3, 4))}, labels)


def test_case_keys_match_the_guard_and_the_editor(tiny_models):
    lm = tiny_models("tiny-llama")
    cases = data.load_counterfact(n=6, seed=1)
    rome = ROME(hparams=FAST)
    frame, vecs = keyspace.case_keys(lm, cases, rome)
    feats = guard.key_features(lm, cases, rome)
    ok = feats[feats.error.isna()].reset_index(drop=True)
    assert list(frame.case_id) == list(ok.case_id)
    np.testing.assert_allclose(frame.denominator, ok.denominator, rtol=1e-6)
    d_k = lm.model.config.intermediate_size
    assert all(v.shape == (len(frame), d_k) for v in vecs.values())
    np.testing.assert_allclose(vecs["C_inv_k"], vecs["k_bar"])  # mom2_adjustment off: u = k̄
    first = next(c for c in cases if c["case_id"] == frame.case_id[0])
    with edited(lm, EditRequest.from_case(first), rome) as result:
        np.testing.assert_allclose(vecs["k_u"][0], result.diagnostics["k_u"].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-llama"])
def test_position_profile_counts_positions_from_the_first_text_token(tiny_models, arch):
    lm = tiny_models(arch)
    prof = keyspace.position_profile(lm, TEXTS, layers=[1, 0], max_len=8)
    bos = int(lm.spec.prepend_bos)
    lengths = [min(8, len(lm.token_ids(t)) - bos) + bos for t in TEXTS]
    assert len(prof) == 2 * sum(lengths)
    assert prof.position.min() == -bos and (prof[prof.position < 0].token == "BOS").all()
    assert (prof.hidden_norm > 0).all() and (prof.key_norm > 0).all()
    # the key norm at (text 0, layer 1, first text token) is the norm of the MLP-out input there
    ids = torch.tensor([lm.token_ids(TEXTS[0])[:8 + bos]], device=lm.device)
    with torch.no_grad(), Trace(lm.model, lm.spec.module("mlp_out", 1), retain_input=True, stop=True) as t:
        lm.model(input_ids=ids)
    got = prof[(prof.text == 0) & (prof.layer == 1) & (prof.position == 0)].key_norm.item()
    assert got == pytest.approx(t.input[0, bos].norm().item(), rel=1e-5)


def test_with_bos_prepends_one_token_to_the_same_model(tiny_models):
    lm = tiny_models("tiny-gpt2")
    b = keyspace.with_bos(lm, lm.tok.eos_token)
    assert b.model is lm.model and b.spec.prepend_bos and b.spec.name == "tiny-gpt2+bos"
    assert b.token_ids("Paris") == [lm.tok.convert_tokens_to_ids(lm.tok.eos_token)] + lm.token_ids("Paris")
    assert lm.token_ids("Paris") == lm.tok("Paris", add_special_tokens=False)["input_ids"]  # the original is unchanged
    with pytest.raises(ValueError, match="not a token"):
        keyspace.with_bos(lm, "<no such token>")


def test_first_position_keys_labels(tiny_models):
    lm = tiny_models("tiny-gpt2")
    labels, vecs = keyspace.first_position_keys(lm, TEXTS, layer=1, max_len=12, n_other=3)
    assert (labels.groupby("text").where.apply(lambda w: (w == "first").sum()) == 1).all()
    assert (labels[labels["where"] == "first"].position == 0).all() and (labels[labels["where"] == "other"].position > 0).all()
    assert vecs["key"].shape == (len(labels), lm.model.config.n_inner or 4 * lm.model.config.n_embd)


def test_second_to_first_changes_exactly_position_0(tiny_models):
    """Second2First on GPT-2: the input of block 0 changes at position 0 only, to wte[x0] + wpe[1];
    the weights are bit-identical afterwards. Rotary models refuse."""
    lm = tiny_models("tiny-gpt2")
    before = snapshot(lm)
    ids = torch.tensor([lm.token_ids(TEXTS[0])], device=lm.device)

    def block0_input():
        with torch.no_grad(), Trace(lm.model, "transformer.h.0", retain_input=True, stop=True) as t:
            lm.model(input_ids=ids)
        return t.input[0]

    plain = block0_input()
    with keyspace.second_to_first(lm):
        moved = block0_input()
    changed = (moved - plain).abs().amax(-1) > 0
    assert changed[0] and not changed[1:].any()
    wte, wpe = lm.model.transformer.wte.weight, lm.model.transformer.wpe.weight
    torch.testing.assert_close(moved[0], wte[ids[0, 0]] + wpe[1])
    assert identical(lm, before)
    with pytest.raises(ValueError, match="rotary"):
        with keyspace.second_to_first(tiny_models("tiny-llama")):
            pass


def test_shifting_positions_changes_nothing_with_rotary_and_everything_with_learned(tiny_models):
    rotary = keyspace.position_shift_effect(tiny_models("tiny-llama"), TEXTS, layer=1, offset=3)
    learned = keyspace.position_shift_effect(tiny_models("tiny-gpt2"), TEXTS, layer=1, offset=3)
    assert rotary.rel_change.max() < 1e-4 and learned.rel_change.min() > 1e-3


def test_line_moments_by_hand(tiny_models):
    """C per line equals Σ k kᵀ / N over every position of every line; without position 0 and the
    first-position C recombine into it; mixing in first-position keys is the convex combination."""
    lm = tiny_models("tiny-gpt2")
    lines = TEXTS[:3]
    ms = keyspace.line_moments(lm, 1, lines, max_len=16)
    keys = []
    for x in lines:
        with torch.no_grad(), Trace(lm.model, lm.spec.module("mlp_out", 1), retain_input=True, stop=True) as t:
            lm.model(input_ids=torch.tensor([lm.token_ids(x)[:16]], device=lm.device))
        keys.append(t.input[0].double().cpu())
    K = torch.cat(keys)
    torch.testing.assert_close(ms["lines"].C, K.T @ K / len(K))
    first = torch.stack([k[0] for k in keys])
    torch.testing.assert_close(ms["first"].C, first.T @ first / 3)
    n, n0 = ms["lines"].count, ms["first"].count
    torch.testing.assert_close(ms["lines_skip_first"].C * (n - n0) + ms["first"].C * n0, ms["lines"].C * n)
    assert ms["lines"].meta["first_share"] == pytest.approx(3 / len(K))
    mixed = keyspace.mix_first(ms["lines_skip_first"], ms["first"], 0.25)
    torch.testing.assert_close(mixed.C, 0.75 * ms["lines_skip_first"].C + 0.25 * ms["first"].C)
    assert keyspace.first_share_of(10_000, 1024) == pytest.approx(1 / 1024)
    assert keyspace.first_share_of(10_000, 1024, skip_first=True) == 0.0


def test_rome_under_moments_reproduces_rome(tiny_models):
    """With C = I the reused-v* update is ROME's own (same denominator, same ‖Δ‖); with C it is ROME's
    mom2_adjustment update with that C. The model is restored after each."""
    from editcollapse.models.stats import second_moment

    lm = tiny_models("tiny-llama")
    case = data.load_counterfact(n=3, seed=2)[0]
    before = snapshot(lm)
    m = second_moment(lm, 1, n_tokens=3000)
    rows = keyspace.rome_under_moments(lm, case, {"I": None, "C": m}, ppl_size=50, editor=ROME(hparams=FAST))
    assert identical(lm, before)
    req = EditRequest.from_case(case)
    for row, editor in zip(rows, [ROME(hparams=FAST), ROME(hparams=dict(FAST, mom2_adjustment=True), stats=m)]):
        with edited(lm, req, editor) as result:
            d = result.diagnostics
            assert row["denominator"] == pytest.approx(d["denominator"], rel=1e-4)
            assert row["delta_norm"] == pytest.approx(d["delta_norm"], rel=1e-3)
            assert row["numerator_norm"] == pytest.approx(d["numerator_norm"], rel=1e-3)
