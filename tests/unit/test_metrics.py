"""Edit metrics against hand computations on tiny random models (one forward, log_softmax by hand)."""
import math

import pytest
import torch

from editcollapse.eval.metrics import (edit_metrics, locality_reference, predict_next, target_nll, target_token_acc,
                                       with_prefix)
from editcollapse.models.loading import load_model
from editcollapse.models.tokens import target_ids
from editcollapse.models.nethook import get_module
from tests import reference
from tests.device import DEVICE

TINY = ["tiny-llama", "tiny-gpt2", "tiny-gemma3"]
PROMPTS = ["The capital of France is", "Danielle Darrieux's mother tongue is", "Toko Yasuda plays the",
           "Autonomous University of Madrid, which is located in", "He spoke"]
TARGETS = ["Paris", "English", "guitar and the piano", "Spain", "French"]


def case(**kw):
    base = dict(case_id=0, prompt=PROMPTS[1], subject="Danielle Darrieux", target_new="English",
                ground_truth="French", rephrase_prompt="Where Danielle Darrieux is from, people speak",
                locality_prompt="Michel Rocard's mother tongue is", locality_ground_truth="French",
                dataset="counterfact")
    return base | kw


@pytest.mark.parametrize("name", TINY)
def test_target_nll_and_acc_match_hand_computation(tiny_models, name):
    lm = tiny_models(name)
    nll, acc = target_nll(lm, PROMPTS, TARGETS), target_token_acc(lm, PROMPTS, TARGETS)
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        h_nll, h_pred, h_t = reference.target_scores(lm, p, t)
        assert nll[i].item() == pytest.approx(h_nll, abs=1e-5)
        assert acc[i].item() == pytest.approx(sum(a == b for a, b in zip(h_pred, h_t)) / len(h_t))


@pytest.mark.parametrize("name", TINY)
def test_batched_equals_unbatched(tiny_models, name):
    lm = tiny_models(name)
    batched = target_nll(lm, PROMPTS, TARGETS)
    one = torch.stack([target_nll(lm, [p], [t])[0] for p, t in zip(PROMPTS, TARGETS)])
    chunked = target_nll(lm, PROMPTS, TARGETS, batch_size=2)
    assert torch.allclose(batched, one, atol=1e-5) and torch.allclose(chunked, one, atol=1e-5)
    assert len({round(x, 3) for x in one.tolist()}) == len(PROMPTS)  # the pairs really differ


def test_tokenization_bos_rule_and_leading_space(tiny_models):
    llama, gpt2 = tiny_models("tiny-llama"), tiny_models("tiny-gpt2")
    bos = llama.tok.bos_token_id
    assert llama.token_ids("He spoke")[0] == bos and gpt2.token_ids("He spoke")[0] != bos
    ids = target_ids(llama, "French")
    assert bos not in ids and llama.tok.decode(ids) == " French"
    with pytest.raises(ValueError, match="non-empty"):
        target_ids(llama, " ")


def _single_token_words(lm):
    """Vocabulary entries " w" that " " + w tokenizes back to: {id: w}."""
    out = {}
    for i in range(len(lm.tok)):
        w = lm.tok.decode([i])
        if w.startswith(" ") and w.strip() and target_ids(lm, w[1:]) == [i]:
            out[i] = w[1:]
    return out


def test_constructed_efficacy_flip(tiny_models):
    """target_new = the model's argmax continuation, ground_truth = its least likely word: efficacy 1; swapped: 0."""
    lm = tiny_models("tiny-llama")
    words = _single_token_words(lm)
    for prompt in PROMPTS:  # the first prompt whose argmax next token is a single-token word
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([lm.token_ids(prompt)], device=lm.device)).logits[0, -1]
        if logits.argmax().item() in words:
            break
    else:
        pytest.fail("no prompt whose argmax is a single-token word")
    best = words[logits.argmax().item()]
    worst = words[min(words, key=lambda i: logits[i].item())]
    assert predict_next(lm, prompt)[0][0] == " " + best

    c = case(prompt=prompt, rephrase_prompt=prompt, locality_prompt=prompt, target_new=best, ground_truth=worst,
             locality_ground_truth=worst)
    m = edit_metrics(lm, c)
    assert m["efficacy"] == m["generalization"] == m["efficacy_acc"] == 1.0
    assert m["locality"] == 0.0  # the neighbour's true object (worst) is less likely than target_new
    assert m["p_new"] > m["p_true"] and m["efficacy_magnitude"] > 0 > m["locality_magnitude"]

    flipped = edit_metrics(lm, c | dict(target_new=worst, ground_truth=best, locality_ground_truth=best))
    assert flipped["efficacy"] == flipped["generalization"] == flipped["efficacy_acc"] == 0.0
    assert flipped["locality"] == 1.0
    assert flipped["efficacy_magnitude"] == pytest.approx(-m["efficacy_magnitude"], abs=1e-7)


def test_metric_values_match_hand_computation(tiny_models):
    lm = tiny_models("tiny-gpt2")
    c = case()
    m = edit_metrics(lm, c)
    nll = {(f, t): reference.target_scores(lm, c[f], c[t])[0] for f in ("prompt", "rephrase_prompt", "locality_prompt")
           for t in ("target_new", "ground_truth")}
    assert m["p_new"] == pytest.approx(math.exp(-nll["prompt", "target_new"]), rel=1e-5)
    assert m["p_true"] == pytest.approx(math.exp(-nll["prompt", "ground_truth"]), rel=1e-5)
    assert m["efficacy_magnitude"] == pytest.approx(m["p_new"] - m["p_true"], abs=1e-7)
    g = math.exp(-nll["rephrase_prompt", "target_new"]) - math.exp(-nll["rephrase_prompt", "ground_truth"])
    assert m["generalization_magnitude"] == pytest.approx(g, abs=1e-7)
    assert m["generalization_prob"] == float(g > 0)
    loc = math.exp(-nll["locality_prompt", "ground_truth"]) - math.exp(-nll["locality_prompt", "target_new"])
    assert m["locality_magnitude"] == pytest.approx(loc, abs=1e-7) and m["locality_prob"] == float(loc > 0)
    _, pred, t = reference.target_scores(lm, c["rephrase_prompt"], c["target_new"])
    assert m["generalization_acc"] == pytest.approx(sum(a == b for a, b in zip(pred, t)) / len(t))
    assert (m["efficacy"], m["locality"]) == (m["efficacy_prob"], m["locality_prob"])
    assert "locality_acc" not in m  # no reference given

    z = edit_metrics(lm, case(dataset="zsre"))
    assert (z["efficacy"], z["generalization"]) == (z["efficacy_acc"], z["generalization_acc"])
    assert "locality" not in z


def test_locality_acc_against_reference():
    lm = load_model("tiny-gpt2", device=DEVICE)  # a private copy: its weights get changed below
    c = case(dataset="zsre", locality_prompt="Which river runs through Paris?",
             locality_ground_truth="the Seine river, which flows into the English Channel")
    ref = locality_reference(lm, c)
    assert ref["pred"] == reference.target_scores(lm, c["locality_prompt"], c["locality_ground_truth"])[1]
    assert edit_metrics(lm, c, ref)["locality"] == 1.0

    w = get_module(lm.model, lm.spec.module("mlp_out", lm.n_layers - 1)).weight
    torch.manual_seed(0)
    with torch.no_grad():
        w += 3 * torch.randn_like(w)
    m = edit_metrics(lm, c, ref)
    post = reference.target_scores(lm, c["locality_prompt"], c["locality_ground_truth"])[1]
    unchanged = sum(a == b for a, b in zip(post, ref["pred"])) / len(post)
    assert m["locality_acc"] == m["locality"] == pytest.approx(unchanged) and unchanged < 1.0


def test_prefix(tiny_models):
    lm = tiny_models("tiny-llama")
    c = case()
    base, pre = edit_metrics(lm, c), edit_metrics(lm, c, prefix="Once upon a time")
    by_hand = edit_metrics(lm, c | dict(prompt="Once upon a time. " + c["prompt"]))
    assert with_prefix("x", "Once upon a time") == "Once upon a time. x"
    assert (pre["p_new"], pre["efficacy_acc"]) == pytest.approx((by_hand["p_new"], by_hand["efficacy_acc"]))
    assert pre["p_new"] != pytest.approx(base["p_new"])
    assert pre["generalization_magnitude"] == pytest.approx(base["generalization_magnitude"])
    assert pre["locality_magnitude"] == pytest.approx(base["locality_magnitude"])
    templ = edit_metrics(lm, c, prefix="Once upon a time. {}")
    assert templ["p_new"] == pytest.approx(pre["p_new"])

    everywhere = ("prompt", "rephrase_prompt", "locality_prompt")
    with pytest.raises(ValueError, match="reference was taken"):
        edit_metrics(lm, c, locality_reference(lm, c), prefix="Once", prefix_fields=everywhere)
    ref = locality_reference(lm, c, prefix="Once", prefix_fields=everywhere)
    assert ref["prompt"] == "Once. " + c["locality_prompt"]
    assert edit_metrics(lm, c, ref, prefix="Once", prefix_fields=everywhere)["locality_acc"] == 1.0
    with pytest.raises(ValueError, match="not prompt fields"):
        edit_metrics(lm, c, prefix="Once", prefix_fields=("subject",))


def test_predict_next(tiny_models):
    lm = tiny_models("tiny-gemma3")
    top = predict_next(lm, PROMPTS[0], k=4)
    with torch.no_grad():
        probs = lm.model(input_ids=torch.tensor([lm.token_ids(PROMPTS[0])], device=lm.device)).logits[0, -1].softmax(-1)
    order = probs.argsort(descending=True)[:4].tolist()
    assert [t for t, _ in top] == [lm.tok.decode([i]) for i in order]
    assert [p for _, p in top] == pytest.approx(probs[order].tolist())
    with pytest.raises(ValueError, match="k must be"):
        predict_next(lm, PROMPTS[0], k=0)


def test_errors(tiny_models):
    lm, gpt2 = tiny_models("tiny-llama"), tiny_models("tiny-gpt2")
    c = case()
    with pytest.raises(ValueError, match="lacks field.*rephrase_prompt"):
        edit_metrics(lm, {k: v for k, v in c.items() if k != "rephrase_prompt"})
    with pytest.raises(ValueError, match="'target_new' is empty"):
        edit_metrics(lm, c | dict(target_new=""))
    with pytest.raises(ValueError, match="'ground_truth' is empty"):
        locality_reference(lm, c | dict(ground_truth="  "))
    with pytest.raises(ValueError, match="'target_new' must be a string, not int 5"):
        edit_metrics(lm, c | dict(target_new=5))
    with pytest.raises(ValueError, match="'locality_ground_truth' must be a string, not NoneType None"):
        locality_reference(lm, c | dict(locality_ground_truth=None))
    with pytest.raises(ValueError, match="'rephrase_prompt' must be a string, not list"):
        edit_metrics(lm, c | dict(rephrase_prompt=["a"]))
    with pytest.raises(ValueError, match="target must be a string, not int 5"):
        target_nll(lm, PROMPTS[:1], [5])
    with pytest.raises(ValueError, match="target must be a non-empty string"):
        target_ids(lm, " ")
    with pytest.raises(ValueError, match="unknown edit dataset"):
        edit_metrics(lm, c | dict(dataset="mquake"))
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        target_nll(lm, PROMPTS[:2], TARGETS[:1])
    with pytest.raises(ValueError, match="has no tokens"):
        target_nll(gpt2, [""], ["Paris"])
    assert target_nll(lm, [""], ["Paris"]).isfinite().all()  # BOS alone is a context


def test_empty_or_misshapen_inputs_get_clear_errors(tiny_models):
    """They used to say 'stack expects a non-empty TensorList', 'selected index k out of range', and list the
    letters of prefix_fields='prompt'."""
    lm = tiny_models("tiny-llama")
    with pytest.raises(ValueError, match=r"no prompts: give at least one \(prompt, target\) pair"):
        target_nll(lm, [], [])
    with pytest.raises(ValueError, match="no prompts"):
        target_token_acc(lm, [], [])
    with pytest.raises(TypeError, match="lists of strings, not one string"):
        target_nll(lm, PROMPTS[0], TARGETS[0])
    with pytest.raises(ValueError, match="k = 1001 is more than the 1000 tokens of tiny-llama's vocabulary"):
        predict_next(lm, PROMPTS[0], k=1001)
    assert len(predict_next(lm, PROMPTS[0], k=1000)) == 1000
    with pytest.raises(TypeError, match=r"prefix_fields must be a list of prompt fields, e.g. \('prompt',\), "
                                        r"not the string 'prompt'"):
        edit_metrics(lm, case(), prefix="Once", prefix_fields="prompt")
