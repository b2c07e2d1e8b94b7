"""Perplexity on tiny models against a hand computation with log_softmax, one sentence at a time."""
import copy
import math

import numpy as np
import pytest
import torch

from editcollapse.data import load_me_ppl
from editcollapse.models.loading import LoadedModel
from editcollapse.eval.perplexity import me_ppl, sentence_perplexities
from editcollapse.models.tokens import length_sorted_batches
from editcollapse.results.labels import is_collapsed
from tests import reference

TEXTS = ["The capital of France is Paris, a city on the Seine.",
         "Danielle Darrieux",
         "Regions and cities Australia has six states, two major mainland territories, and other minor territories"]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_matches_hand_computation_in_input_order(tiny_models, name):
    lm = tiny_models(name)
    got = sentence_perplexities(lm, TEXTS, batch_size=3, progress=False)
    want = [reference.perplexity(lm, t) for t in TEXTS]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the normaliser is the number of predicted tokens, not the number of input tokens
    assert not np.allclose(got, [reference.perplexity(lm, t, divide_by_all=True) for t in TEXTS], rtol=1e-3)


def test_bos_rule_sets_the_predicted_tokens(tiny_models):
    gpt2, llama = tiny_models("tiny-gpt2"), tiny_models("tiny-llama")
    text = "The"
    raw = gpt2.tok(text, add_special_tokens=False)["input_ids"]
    assert len(raw) == 1 and gpt2.token_ids(text) == raw and llama.token_ids(text) == [llama.tok.bos_token_id] + raw
    # without BOS a one-token text has nothing to predict; with BOS its single token is predicted
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        sentence_perplexities(gpt2, [text], progress=False)
    logp, _ = reference.token_logprobs(llama, [llama.tok.bos_token_id], raw, torch.float64)
    got = sentence_perplexities(llama, [text], progress=False)[0]
    assert got == pytest.approx(math.exp(-logp[0].item()), rel=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gptj", "tiny-llama", "tiny-gemma3"])
def test_batched_equals_unbatched(tiny_models, name):
    lm = tiny_models(name)
    texts = load_me_ppl(50)[:16]
    one = sentence_perplexities(lm, texts, batch_size=1, progress=False)
    many = sentence_perplexities(lm, texts, batch_size=8, progress=False)
    lengths = [len(lm.token_ids(t)) for t in texts]
    assert len(set(lengths)) > 8  # real padding happened
    np.testing.assert_allclose(many, one, rtol=1e-4)


def test_me_ppl_mean_and_median(tiny_models, monkeypatch):
    lm = tiny_models("tiny-gpt2")
    texts = TEXTS + ["Toko Yasuda, the"]
    monkeypatch.setattr("editcollapse.eval.perplexity.load_me_ppl", lambda size: texts)
    hand = sorted(reference.perplexity(lm, t) for t in texts)
    res = me_ppl(lm, size=50, batch_size=2, progress=False)
    assert res["n"] == 4
    assert res["mean"] == pytest.approx(sum(hand) / 4, rel=1e-5)
    assert res["median"] == pytest.approx((hand[1] + hand[2]) / 2, rel=1e-5)
    assert res["mean"] != pytest.approx(res["median"], rel=1e-3)


def test_length_sorted_batches():
    batches = length_sorted_batches([3, 9, 1, 7, 5], batch_size=2)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 0], [2]]
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches([1], 0)


def test_bad_inputs(tiny_models):
    lm = tiny_models("tiny-gpt2")
    with pytest.raises(TypeError, match="list of strings"):
        sentence_perplexities(lm, "one string", progress=False)
    with pytest.raises(ValueError, match="positions"):
        sentence_perplexities(lm, [" Paris" * 300], progress=False)


def test_misleading_inputs_get_clear_errors(tiny_models, monkeypatch):
    lm = tiny_models("tiny-gpt2")
    with pytest.raises(ValueError, match=r"1 of 1 are not, the first is texts\[0\] = None \(NoneType\)"):
        sentence_perplexities(lm, [None], progress=False)
    with pytest.raises(ValueError, match=r"2 of 3 are not, the first is texts\[1\] = 5 \(int\)"):
        sentence_perplexities(lm, ["Paris is nice", 5, b"bytes"], progress=False)
    for size in ("50", 50.0, True, 100, None):
        with pytest.raises(ValueError, match=rf"size must be one of the ints 50, 1000, 10000 .*not {size!r:.4}"):
            me_ppl(lm, size=size, progress=False)
    asked = []
    monkeypatch.setattr("editcollapse.eval.perplexity.load_me_ppl", lambda size: asked.append(size) or TEXTS)
    me_ppl(lm, size=np.int64(50), progress=False)
    assert asked == [50] and type(asked[0]) is int


def _broken(lm, fn):
    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        fn(model)
    return LoadedModel(model, lm.tok, lm.spec)


def test_overflowing_model_gives_inf_and_nan_model_gives_nan(tiny_models):
    lm = tiny_models("tiny-gpt2")
    huge = _broken(lm, lambda m: m.transformer.ln_f.weight.mul_(1e30))  # logits ~1e30: finite, NLL overflows exp
    ppl = sentence_perplexities(huge, TEXTS, progress=False)
    assert np.isposinf(ppl).all() and is_collapsed(ppl).all()
    nan = _broken(lm, lambda m: m.transformer.ln_f.weight.fill_(float("nan")))
    with pytest.warns(RuntimeWarning, match="NaN"):
        ppl = sentence_perplexities(nan, TEXTS, progress=False)
    assert np.isnan(ppl).all() and is_collapsed(ppl).all()
