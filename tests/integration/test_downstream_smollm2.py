"""Downstream evaluator on SmolLM2-135M: a few items per task (CPU-sized); bench/bench_downstream.py runs more."""
import pytest

from editcollapse import downstream as ds

pytestmark = pytest.mark.integration


def test_piqa_beats_chance(smollm2):
    res = ds.evaluate(smollm2, "piqa", n=100, seed=0)
    assert res["n"] == 100
    assert res["acc"] >= 0.55 and 0.5 <= res["acc_norm"] <= 1  # measured 0.60 / 0.60 (chance 0.5, sd 0.05)


def test_lambada_perplexity_is_that_of_a_language_model(smollm2):
    res = ds.evaluate(smollm2, "lambada", n=6, seed=0)
    assert 0 <= res["acc"] <= 1
    assert 1 < res["perplexity"] < 1000  # uniform guessing over 49,152 tokens would give far more


def test_multiple_choice_tasks_in_range(smollm2):
    df = ds.evaluate_all(smollm2, tasks=["hellaswag", "mmlu"], n=3, seed=0)
    assert list(zip(df.task, df.metric)) == [("hellaswag", "acc"), ("hellaswag", "acc_norm"), ("mmlu", "acc")]
    assert df.value.between(0, 1).all() and (df.n == 3).all()


def test_generative_tasks_in_range_and_a_known_answer(smollm2):
    shots = ds.data.load_nq()[:ds.NQ_SHOTS]
    questions = {"who wrote romeo and juliet": "William Shakespeare",
                 "what is the largest planet in the solar system": "Jupiter"}
    answers = ds.greedy_generate(smollm2, [ds.nq_prompt(q, shots) for q in questions], stop=("\n", ".", ","))
    assert [ds.squad_em(a, g) for a, g in zip(answers, questions.values())] == [1.0, 1.0], answers
    for task in ("nq", "squad2"):
        res = ds.evaluate(smollm2, task, n=2, seed=0)
        assert res["n"] == 2
        assert all(0 <= v <= 1 for k, v in res.items() if k != "n")
