"""Downstream scores of SmolLM2-135M through lm-eval, checked item by item against hand computations
(one unbatched forward pass per choice, greedy decoding without cache) on a few items per task;
bench/bench_downstream.py runs more items."""
import collections
import re
import string

import numpy as np
import pytest

from editcollapse import data
from editcollapse.eval import downstream as ds
from tests import reference

pytestmark = pytest.mark.integration


def squad_tokens(s):
    s = "".join(ch for ch in s.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", s).split()


def hand_f1(prediction, gold):
    pred, ref = squad_tokens(prediction), squad_tokens(gold)
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    return 0.0 if same == 0 else 2 * same / (len(pred) + len(ref))


def test_piqa_items_by_hand(smollm2):
    table = ds.evaluate_all(smollm2, ["piqa"], n=5, seed=0).set_index("metric")
    acc, acc_norm = [], []
    for d in data.load_piqa(n=5, seed=0):
        lls = [reference.loglikelihood(smollm2, f"Question: {d['goal']}\nAnswer:", " " + c)[0] for c in d["choices"]]
        acc.append(float(np.argmax(lls) == d["label"]))
        acc_norm.append(float(np.argmax([ll / len(c) for ll, c in zip(lls, d["choices"])]) == d["label"]))
    assert table.loc["acc", "items"] == acc and table.loc["acc_norm", "items"] == acc_norm
    assert table.loc["acc", "value"] == pytest.approx(np.mean(acc))


def test_hellaswag_and_mmlu_items_by_hand(smollm2):
    model = ds.live_model(smollm2)
    for task, n in (("hellaswag", 3), ("mmlu", 3)):
        for item in ds.run(model, ds.load_task(task), n=n, seed=1)["samples"]:
            lls = [reference.loglikelihood(smollm2, ctx, cont)[0] for ctx, cont in item["arguments"]]
            assert item["acc"] == float(np.argmax(lls) == item["target"]), (task, item["doc_id"])
            assert [r[0][0] for r in item["resps"]] == pytest.approx(lls, abs=2e-3)


def test_lambada_items_and_perplexity_by_hand(smollm2):
    table = ds.evaluate_all(smollm2, ["lambada"], n=4, seed=0).set_index("metric")
    passages = [text.rsplit(" ", 1) for text in data.load_lambada(n=4, seed=0)]  # (context, last word)
    hand = [reference.loglikelihood(smollm2, ctx, " " + word) for ctx, word in passages]
    assert table.loc["perplexity", "items"] == pytest.approx([ll for ll, _ in hand], abs=2e-3)
    assert table.loc["acc", "items"] == [float(g) for _, g in hand]
    assert table.loc["perplexity", "value"] == pytest.approx(np.exp(-np.mean([ll for ll, _ in hand])), rel=1e-3)
    assert 1 < table.loc["perplexity", "value"] < 1000  # a language model, not uniform over 49,152 tokens


def test_squad2_generation_and_f1_by_hand(smollm2):
    out = ds.run(ds.live_model(smollm2), ds.load_task("squad2"), n=1, seed=0)
    for item, doc in zip(out["samples"], data.load_squad2(n=1, seed=0)):
        prompt, gen = item["arguments"][0]
        want = reference.greedy(smollm2, prompt, gen["max_gen_toks"], gen["until"], stop_while_decoding=True)
        assert item["resps"][0][0] == want
        assert item["f1"] == pytest.approx(hand_f1(want, doc["answer"]))
        assert item["exact_match"] == float(squad_tokens(want) == squad_tokens(doc["answer"]))


def test_nq_knows_two_famous_answers(smollm2):
    """Two questions this model answers: greedy answers by hand in lm-eval's 5-shot NQ prompt match."""
    task = ds.load_task("nq")
    shots = "\n".join(f"Q: {r['question']}?\nA: {r['answer'][0]}" for r in data.load_nq()[:5])
    for question, gold in (("who wrote romeo and juliet", "William Shakespeare"),
                           ("what is the largest planet in the solar system", "Jupiter")):
        answer = reference.greedy(smollm2, f"Answer these questions:\n\n{shots}\nQ: {question}?\nA:", 16,
                                  ["\n", ".", ","], stop_while_decoding=True)
        assert task.process_results({"question": question, "answer": [gold]}, [answer.strip()]) == \
            {"exact_match": 1.0}, answer
    res = ds.evaluate(smollm2, "nq", n=3, seed=0)
    assert res["n"] == 3 and 0 <= res["exact_match"] <= 1
