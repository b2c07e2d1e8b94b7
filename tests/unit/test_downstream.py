"""Downstream evaluation through lm-eval on tiny random models: the live model is wrapped, not copied;
the BOS rule; scores against hand computations; prompts and metrics are lm-eval's own; user tasks."""
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lm_eval.api.instance import Instance

from editcollapse import data
from editcollapse.eval import downstream as ds
from tests import reference
from tests.weights import identical, snapshot

PAIRS = [("The capital of France is", " Paris"),
         ("Question: How do you boil water?\nAnswer:", " Put it in a pot and heat it."),
         ("a b c d e f g h i j k", " l m"),
         ("The", " Eiffel Tower is in Paris, the capital of France."),
         ("Which is right?\nAnswer:", " A"), ("Which is right?\nAnswer:", " B")]  # one shared context
PROMPTS = ["The capital of France is", "Question: How do you boil water?\nAnswer:", "Hi", "Paris is the capital of"]
LMEVAL_TASKS_DIR = Path(__import__("lm_eval").__file__).parent / "tasks"


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def test_the_live_model_is_wrapped_not_copied_and_left_unchanged(tiny_models):
    lm = tiny_models("tiny-gpt2")
    before = snapshot(lm)
    model = ds.live_model(lm)
    assert model.model is lm.model and model.tokenizer is lm.tok
    assert identical(lm, before)


def test_an_edit_in_place_is_what_lm_eval_scores(tiny_models):
    lm = tiny_models("tiny-llama")
    base = ds.evaluate(lm, "lambada", n=3)
    w = lm.model.lm_head.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(-1.0)
    try:
        edited = ds.evaluate(lm, "lambada", n=3)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert edited["perplexity"] != pytest.approx(base["perplexity"], rel=1e-3)
    assert ds.evaluate(lm, "lambada", n=3) == base


@pytest.mark.parametrize("name, bos", [("tiny-llama", True), ("tiny-gpt2", False)])
def test_bos_rule_applies_once_at_the_front(tiny_models, name, bos):
    lm = tiny_models(name)
    model = ds.live_model(lm)
    assert lm.spec.prepend_bos is bos
    assert model.tok_encode("Hello world") == lm.token_ids("Hello world")
    ctx, cont = model._encode_pair("The capital of France is", " Paris")
    assert ctx == lm.token_ids("The capital of France is")
    assert cont == lm.token_ids("The capital of France is Paris")[len(ctx):]
    assert lm.tok.bos_token_id not in cont and (ctx[0] == lm.tok.bos_token_id) is bos
    ids, mask = model.tok_batch_encode(["Hi", "Hello world"])
    assert ids[0, -len(lm.token_ids("Hi")):].tolist() == lm.token_ids("Hi") and mask[0, 0] == 0  # left padding


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_loglikelihood_matches_hand_computation(tiny_models, name, batch_size):
    lm = tiny_models(name)
    got = ds.live_model(lm, batch_size).loglikelihood(requests("loglikelihood", PAIRS))
    for (ll, greedy), (ctx, cont) in zip(got, PAIRS):
        want_ll, want_greedy = reference.loglikelihood(lm, ctx, cont)
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert greedy == want_greedy


def test_trailing_context_space_moves_to_the_continuation(tiny_models):
    lm = tiny_models("tiny-gpt2")
    (a, _), (b, _) = ds.live_model(lm).loglikelihood(requests("loglikelihood", [("The capital of France is ", "Paris"),
                                                                               ("The capital of France is", " Paris")]))
    assert a == pytest.approx(b, abs=1e-6)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_generation_matches_manual_greedy_and_batching(tiny_models, name):
    lm = tiny_models(name)
    stop = ["s ", "::"]  # strings these random models produce, so that cutting is exercised
    args = [(p, {"until": stop, "max_gen_toks": 6, "do_sample": False}) for p in PROMPTS]
    batched = ds.live_model(lm, len(PROMPTS)).generate_until(requests("generate_until", args))
    single = [ds.live_model(lm, 1).generate_until(requests("generate_until", [a]))[0] for a in args]
    assert batched == single == [reference.greedy(lm, p, 6, stop) for p in PROMPTS]
    assert batched != [reference.greedy(lm, p, 6, ()) for p in PROMPTS]


def test_piqa_items_equal_direct_scoring(tiny_models):
    lm = tiny_models("tiny-llama")
    table = ds.evaluate_all(lm, ["piqa"], n=6, seed=1)
    docs = data.load_piqa(n=6, seed=1)
    acc, acc_norm = [], []
    for d in docs:
        lls = [reference.loglikelihood(lm, f"Question: {d['goal']}\nAnswer:", " " + s)[0] for s in d["choices"]]
        acc.append(float(np.argmax(lls) == d["label"]))
        acc_norm.append(float(np.argmax([ll / len(s) for ll, s in zip(lls, d["choices"])]) == d["label"]))
    got = table.set_index("metric")
    assert got.loc["acc", "items"] == acc and got.loc["acc_norm", "items"] == acc_norm
    assert got.loc["acc", "value"] == pytest.approx(np.mean(acc)) and (table.n == 6).all()


def test_mmlu_prompt_and_items_equal_direct_scoring(tiny_models):
    lm = tiny_models("tiny-gpt2")
    out = ds.run(ds.live_model(lm), ds.load_task("mmlu"), n=3, seed=8)
    docs = data.load_mmlu("test", n=3, seed=8)  # prompts that fit the tiny model's 256 positions
    for d, item in zip(docs, out["samples"]):
        prompt = (f"The following are multiple choice questions (with answers) about {d['subject'].replace('_', ' ')}."
                  f"\n\n{d['question'].strip()}\n" + "".join(f"{k}. {c}\n" for k, c in zip("ABCD", d["choices"]))
                  + "Answer:")
        assert item["arguments"] == [(prompt, " A"), (prompt, " B"), (prompt, " C"), (prompt, " D")]
        assert len(lm.token_ids(prompt)) < 255
        lls = [reference.loglikelihood(lm, prompt, " " + k)[0] for k in "ABCD"]
        assert item["acc"] == float(np.argmax(lls) == d["label"])


def test_prompts_are_lm_evals(tiny_models):
    lm = tiny_models("tiny-gpt2")
    model = ds.live_model(lm)
    hs = data.load_hellaswag(n=1, seed=0)[0]
    (item,) = ds.run(model, ds.load_task("hellaswag"), n=1, seed=0)["samples"]
    query = f"{hs['activity_label']}: {hs['ctx_a']} {hs['ctx_b'].capitalize()}".strip().replace(" [title]", ". ")
    query = re.sub(r"\[.*?\]", "", query).replace("  ", " ")  # the WikiHow clean-up of lm-eval's HellaSwag
    assert item["arguments"][0][0] == query and len(item["arguments"]) == 4
    text = data.load_lambada(n=1, seed=3)[0]
    (item,) = ds.run(model, ds.load_task("lambada"), n=1, seed=3)["samples"]
    ctx, word = text.rsplit(" ", 1)
    assert item["arguments"][0] == (ctx, " " + word)
    nq = data.load_nq()
    (item,) = ds.run(model, ds.load_task("nq"), n=1, seed=0)["samples"]
    q = nq[5 + data.sample_indices(len(nq) - 5, 1, 0)[0]]["question"]
    shots = "\n".join(f"Q: {r['question']}?\nA: {r['answer'][0]}" for r in nq[:5])
    assert item["arguments"][0][0] == f"Answer these questions:\n\n{shots}\nQ: {q}?\nA:"
    assert item["arguments"][0][1]["until"] == ["\n", ".", ","]
    sq = data.load_squad2(n=1, seed=0)[0]
    (item,) = ds.run(model, ds.load_task("squad2"), n=1, seed=0)["samples"]
    assert item["arguments"][0][0] == f"Background: {sq['context']}\n\nQuestion: {sq['question']}\n\nAnswer:"


def lm_eval_config(path):
    """An lm-eval YAML config read with lm-eval's loader (its !function tags kept as callables)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(str(path), resolve_func=False)


@pytest.mark.parametrize("ours, theirs", [("piqa_local", "piqa/piqa.yaml"), ("hellaswag_local", "hellaswag/hellaswag.yaml"),
                                          ("lambada_openai_local", "lambada/lambada_openai.yaml"),
                                          ("nq_open_local", "nq_open/nq_open.yaml"),
                                          ("mmlu_local", "mmlu/default/_default_template_yaml")])
def test_our_configs_keep_lm_evals_prompts_and_metrics(ours, theirs):
    mine = lm_eval_config(ds.TASK_DIR / f"{ours}.yaml")
    ref = lm_eval_config(LMEVAL_TASKS_DIR / theirs)
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "filter_list",
                "target_delimiter", "fewshot_delimiter"):
        assert mine.get(key) == ref.get(key), key
    gen = dict(mine.get("generation_kwargs") or {})
    assert gen.pop("max_gen_toks", 16) in (16, 32) and gen == (ref.get("generation_kwargs") or {})  # see the headers
    if ours != "mmlu_local":
        assert mine.get("description") == ref.get("description")
        assert mine["metadata"]["version"] == ref["metadata"]["version"]


def test_metrics_are_lm_evals_on_hand_examples():
    nq = ds.load_task("nq")
    doc = {"question": "who sang hey jude", "answer": ["The Beatles", "Paul McCartney"]}
    assert nq.process_results(doc, ["the Beatles."]) == {"exact_match": 1.0}  # case, punctuation, article
    assert nq.process_results(doc, ["Beatles band"]) == {"exact_match": 0.0}
    squad = ds.load_task("squad2")
    doc = {"answers": ["a cat sat down"]}
    # tokens {cat, sat} vs {cat, sat, down}: P = 2/2, R = 2/3, F1 = 2PR/(P+R) = 0.8
    assert squad.process_results(doc, [" the cat sat"]) == pytest.approx({"exact_match": 0, "f1": 0.8})
    assert squad.process_results({"answers": ["Paris", "London"]}, ["in Paris France"])["f1"] == pytest.approx(0.5)
    assert squad.process_results({"answers": ["Cat"]}, ["The cat."]) == {"exact_match": 1, "f1": 1.0}


def test_evaluate_all_is_tidy_and_items_give_the_value(tiny_models):
    lm = tiny_models("tiny-gpt2")
    df = ds.evaluate_all(lm, n=2)
    assert list(df.columns) == ds.COLUMNS
    assert list(zip(df.task, df.metric)) == [
        ("piqa", "acc"), ("piqa", "acc_norm"), ("hellaswag", "acc"), ("hellaswag", "acc_norm"), ("mmlu", "acc"),
        ("lambada", "perplexity"), ("lambada", "acc"), ("nq", "exact_match"), ("squad2", "exact_match"),
        ("squad2", "f1")]
    assert (df.n == 2).all() and all(len(i) == 2 for i in df["items"])
    ppl = df.metric == "perplexity"
    assert df.value[~ppl].between(0, 1).all() and (df.value[ppl] > 1).all()
    for r in df.itertuples():
        want = np.exp(-np.mean(r.items)) if r.metric == "perplexity" else np.mean(r.items)
        assert r.value == pytest.approx(want)
    assert set(df.lmeval_task) == set(ds.LMEVAL_TASKS.values())


def test_samples_are_nested_and_global_random_state_is_left_alone(tiny_models):
    lm = tiny_models("tiny-gpt2")
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    small = ds.evaluate_all(lm, ["piqa"], n=3, seed=4).set_index("metric")
    big = ds.evaluate_all(lm, ["piqa"], n=8, seed=4).set_index("metric")
    pos = [data.sample_indices(1838, 8, 4).index(i) for i in data.sample_indices(1838, 3, 4)]
    assert [big.loc["acc", "items"][p] for p in pos] == small.loc["acc", "items"]
    assert random.getstate() == state[0] and (np.random.get_state()[1] == state[1]).all()
    assert torch.equal(torch.get_rng_state(), state[2])


def test_a_users_own_lm_eval_task_runs_by_name(tiny_models, tmp_path):
    lm = tiny_models("tiny-llama")
    rows = [{"q": "Is fire hot?", "options": ["yes", "no"], "gold": 0},
            {"q": "Is ice hot?", "options": ["yes", "no"], "gold": 1},
            {"q": "Two plus two is", "options": ["four", "five", "six"], "gold": 0}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "my_qa.yaml").write_text(yaml.safe_dump(dict(
        task="my_qa", dataset_path="json", dataset_kwargs={"data_files": {"test": str(tmp_path / "qa.jsonl")}},
        test_split="test", output_type="multiple_choice", doc_to_text="{{q}}", doc_to_choice="{{options}}",
        doc_to_target="{{gold}}", metric_list=[{"metric": "acc"}], metadata={"version": 1})))
    got = ds.evaluate(lm, "my_qa", include_path=tmp_path)
    want = [float(np.argmax([reference.loglikelihood(lm, r["q"], " " + o)[0] for o in r["options"]]) == r["gold"])
            for r in rows]
    assert got == {"acc": pytest.approx(np.mean(want)), "n": 3}


def test_unknown_task_and_bad_n_are_rejected(tiny_models, monkeypatch):
    lm = tiny_models("tiny-llama")
    ours_only = ds._task_manager
    monkeypatch.setattr(ds, "_task_manager", lambda include, defaults: ours_only(include, False))  # no 14k-config index
    with pytest.raises(ValueError, match="unknown downstream task 'no_such_task'.*piqa"):
        ds.evaluate(lm, "no_such_task")
    with pytest.raises(ValueError, match="n must be"):
        ds.evaluate(lm, "piqa", n=0)
    with pytest.raises(ValueError, match="n must be"):
        ds.evaluate_all(lm, ["piqa"], n=-3)
