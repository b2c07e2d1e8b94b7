"""Downstream evaluator on tiny random models: scores against hand computations, batching, metrics."""
import pytest
import torch

from editcollapse import downstream as ds

PAIRS = [("The capital of France is", " Paris"),
         ("Question: How do you boil water?\nAnswer:", " Put it in a pot and heat it."),
         ("a b c d e f g h i j k", " l m"),
         ("The", " Eiffel Tower is in Paris, the capital of France."),
         ("Which is right?\nAnswer:", " A"), ("Which is right?\nAnswer:", " B")]  # one shared input
PROMPTS = ["The capital of France is", "Question: How do you boil water?\nAnswer:", "Hi", "Paris is the capital of"]


def hand_loglikelihood(lm, ctx, cont):
    """One unbatched forward over token_ids(ctx) + the extra tokens of token_ids(ctx + cont)."""
    ctx_ids = lm.token_ids(ctx)
    cont_ids = lm.token_ids(ctx + cont)[len(ctx_ids):]
    ids = torch.tensor([ctx_ids + cont_ids])
    logp = torch.log_softmax(lm.model(ids).logits[0].double(), -1)
    total, greedy = 0.0, True
    for k, tok in enumerate(cont_ids):
        row = logp[len(ctx_ids) + k - 1]
        total += row[tok].item()
        greedy &= int(row.argmax()) == tok
    return total, greedy


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_loglikelihood_matches_hand_computation(tiny_models, name):
    lm = tiny_models(name)
    for (ll, greedy), (ctx, cont) in zip(ds.loglikelihood(lm, PAIRS, batch_size=1), PAIRS):
        want_ll, want_greedy = hand_loglikelihood(lm, ctx, cont)
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert greedy == want_greedy


def test_bos_rule_applies_once_at_the_front(tiny_models):
    lm = tiny_models("tiny-llama")  # prepend_bos=True
    assert lm.token_ids("x")[0] == lm.tok.bos_token_id
    ll, _ = ds.loglikelihood(lm, [("The capital of France is", " Paris")])[0]
    paris = lm.token_ids("The capital of France is Paris")[len(lm.token_ids("The capital of France is")):]
    assert lm.tok.bos_token_id not in paris
    assert ll == pytest.approx(hand_loglikelihood(lm, "The capital of France is", " Paris")[0], abs=1e-4)


def test_trailing_context_space_moves_to_the_continuation(tiny_models):
    lm = tiny_models("tiny-gpt2")
    ctx = "The capital of France is"
    (a, _), (b, _) = ds.loglikelihood(lm, [(ctx + " ", "Paris"), (ctx, " Paris")])
    assert a == pytest.approx(b, abs=1e-6)


def test_greedy_flag_true_for_the_models_own_argmax(tiny_models):
    lm = tiny_models("tiny-llama")
    ctx = "The capital of France is"
    ids = lm.token_ids(ctx)
    nxt = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
    cont = lm.tok.decode([nxt])
    assert lm.token_ids(ctx + cont)[len(ids):] == [nxt]  # the argmax token re-tokenizes to itself
    assert ds.loglikelihood(lm, [(ctx, cont)])[0][1] is True


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def test_batched_scores_equal_unbatched(tiny_models, name):
    lm = tiny_models(name)
    batched = ds.loglikelihood(lm, PAIRS, batch_size=len(PAIRS))
    single = [ds.loglikelihood(lm, [p])[0] for p in PAIRS]
    for (a, ga), (b, gb) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb


def manual_greedy(lm, prompt, max_new_tokens, stop):
    """Greedy decoding without cache or padding: argmax, append, repeat; cut at EOS and at the first stop."""
    ids = lm.token_ids(prompt)
    new = []
    for _ in range(max_new_tokens):
        tok = int(lm.model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if tok == lm.tok.eos_token_id:
            break
        new.append(tok)
    text = lm.tok.decode(new, skip_special_tokens=True)
    for s in stop:
        text = text.split(s)[0]
    return text


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_generation_matches_manual_greedy_and_batching(tiny_models, name):
    lm = tiny_models(name)
    stop = ("s ", "::")  # strings these random models produce, so that cutting is exercised
    batched = ds.greedy_generate(lm, PROMPTS, max_new_tokens=6, stop=stop, batch_size=len(PROMPTS))
    single = [ds.greedy_generate(lm, [p], max_new_tokens=6, stop=stop)[0] for p in PROMPTS]
    assert batched == single
    assert batched == [manual_greedy(lm, p, 6, stop) for p in PROMPTS]
    assert batched != [manual_greedy(lm, p, 6, ()) for p in PROMPTS]
    assert not any(s in t for t in batched for s in stop)


def test_mc_correct_acc_and_acc_norm_can_disagree():
    # acc: -10 > -12 picks choice 0; acc_norm: -10/2 = -5 < -12/8 = -1.5 picks choice 1
    assert ds.mc_correct([-10.0, -12.0], ["ab", "abcdefgh"], 0) == (True, False)
    assert ds.mc_correct([-10.0, -12.0], ["ab", "abcdefgh"], 1) == (False, True)
    assert ds.mc_correct([-3.0, -1.0, -2.0, -4.0], list("ABCD"), 1) == (True, True)


def test_piqa_accuracy_equals_direct_scoring(tiny_models):
    lm = tiny_models("tiny-llama")
    res = ds.evaluate(lm, "piqa", n=6, seed=1)
    docs = ds.data.load_piqa(n=6, seed=1)
    acc = acc_norm = 0
    for d in docs:
        lls = [hand_loglikelihood(lm, f"Question: {d['goal']}\nAnswer:", " " + s)[0] for s in d["choices"]]
        acc += max(range(2), key=lambda i: lls[i]) == d["label"]
        acc_norm += max(range(2), key=lambda i: lls[i] / len(d["choices"][i])) == d["label"]
    assert res == {"acc": acc / 6, "acc_norm": acc_norm / 6, "n": 6}


def test_task_formats_follow_lm_eval():
    assert ds.hellaswag_preprocess(" Making a cake: [header] How to bake [title] Mix flour. ") == \
        "Making a cake: How to bake. Mix flour."
    q, endings, label = ds.hellaswag_item(dict(activity_label="Pole vault", ctx_a="A man runs.", ctx_b="he jumps",
                                               endings=["high [step] now.", "low."], label="1"))
    assert (q, endings, label) == ("Pole vault: A man runs. He jumps", ["high now.", "low."], 1)
    prompt, choices, label = ds.mmlu_item(dict(subject="high_school_physics", question=" What is 2+2? ",
                                               choices=["1", "2", "3", "4"], label=3))
    assert prompt == ("The following are multiple choice questions (with answers) about high school physics.\n\n"
                      "What is 2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert (choices, label) == (["A", "B", "C", "D"], 3)
    assert ds.lambada_item("he said to her\n\nhello") == ("he said to", " her\n\nhello")
    assert ds.lambada_item("one two three") == ("one two", " three")
    assert ds.nq_prompt("who wrote hamlet", [dict(question="capital of france", answer=["Paris", "paris"])]) == \
        "Answer these questions:\nQ: capital of france?\nA: Paris\nQ: who wrote hamlet?\nA:"


def test_squad_metrics_on_hand_examples():
    assert ds.squad_normalize("The  Cat, sat!") == "cat sat"
    assert ds.squad_em("The cat.", "cat") == 1.0
    assert ds.squad_em("a dog", ["cat", "Dog"]) == 1.0
    assert ds.squad_em("cats", "cat") == 0.0
    # tokens {cat, sat} vs {cat, sat, down}: P = 2/2, R = 2/3, F1 = 2PR/(P+R) = 0.8
    assert ds.squad_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # one common token of 3 predicted and 1 gold: P = 1/3, R = 1, F1 = 0.5; best over aliases
    assert ds.squad_f1("in Paris France", ["Paris", "London"]) == pytest.approx(0.5)
    assert ds.squad_f1("the", "a") == 1.0  # both normalise to empty
    assert ds.squad_f1("dog", "cat") == 0.0


def test_unknown_task_and_bad_n_are_rejected(tiny_models):
    lm = tiny_models("tiny-llama")
    with pytest.raises(ValueError, match="unknown downstream task 'arc'.*piqa"):
        ds.evaluate(lm, "arc")
    with pytest.raises(ValueError, match="unknown downstream task"):
        ds.evaluate_all(lm, tasks=["piqa", "boolq"])
    with pytest.raises(ValueError, match="n must be"):
        ds.evaluate(lm, "piqa", n=0)


def test_evaluate_all_is_tidy(tiny_models):
    lm = tiny_models("tiny-gpt2")
    df = ds.evaluate_all(lm, n=2)
    assert list(df.columns) == ["task", "metric", "value", "n"]
    assert list(zip(df.task, df.metric)) == [
        ("piqa", "acc"), ("piqa", "acc_norm"), ("hellaswag", "acc"), ("hellaswag", "acc_norm"), ("mmlu", "acc"),
        ("lambada", "acc"), ("lambada", "perplexity"), ("nq", "exact_match"), ("squad2", "exact_match"),
        ("squad2", "f1")]
    assert (df.n == 2).all()
    ppl = df.metric == "perplexity"
    assert df.value[~ppl].between(0, 1).all() and (df.value[ppl] > 1).all()
