"""The seeded, nested samples the notebooks rely on (notebooks sharing a results store reuse each other's
edits only if a smaller sample is part of a larger one): `data.load_cases`, `single.first_token_cases`,
`single.quick_sample`. Also the data a tiny model needs."""
import pytest

from editcollapse import data

from editcollapse.experiments import single
from editcollapse.data import MissingDataError
from editcollapse.models.loading import tiny_tokenizer
from tests.device import DEVICE

SIZES = (1, 3, 10, 40, 200)


def ids(cases):
    return [c["case_id"] for c in cases]


def check_nested_sorted_unique(samples: list[list[dict]]) -> None:
    """Each sample sorted by case_id without duplicates; each one part of the next."""
    for small, large in zip(samples, samples[1:]):
        assert set(ids(small)) <= set(ids(large))
    for s in samples:
        assert ids(s) == sorted(set(ids(s)))


@pytest.mark.parametrize("dataset, total", [("counterfact", 21919), ("zsre", 1000)])
def test_load_cases_is_nested_deterministic_and_sorted(dataset, total):
    samples = [data.load_cases(dataset, n, seed=0) for n in SIZES]
    assert [len(s) for s in samples] == list(SIZES)
    check_nested_sorted_unique(samples)
    assert data.load_cases(dataset, 40, seed=0) == samples[3]  # deterministic
    other = data.load_cases(dataset, 200, seed=1)
    assert ids(other) != ids(samples[-1]) and len(set(ids(other)) & set(ids(samples[-1]))) < 100
    everything = data.load_cases(dataset)
    assert len(everything) == total and ids(everything) == sorted(set(ids(everything)))
    assert ids(data.load_cases(dataset, total + 5)) == ids(everything)
    assert all(c["dataset"] == dataset for c in samples[-1])


def first_token_by_hand(lm, case) -> bool:
    """The prompt starts with the subject, and the subject is exactly the prompt's first token (after BOS)."""
    prompt, subject = case["prompt"], case["subject"]
    alone = lm.tok(subject, add_special_tokens=False)["input_ids"]
    first = lm.token_ids(prompt)[int(lm.spec.prepend_bos)]
    return prompt.startswith(subject) and alone == [first]


@pytest.fixture(scope="module")
def pool():
    """300 CounterFact cases plus cases rewritten to start with a one-token subject (the tiny tokenizer
    makes few real CounterFact subjects one token: a pool with enough first-token cases to sample from)."""
    from editcollapse.models.loading import load_model

    cases = data.load_cases("counterfact", 300, seed=0)
    tok = load_model("tiny-llama", device=DEVICE).tok
    words = sorted({w for w in (tok.decode([i]) for i in range(len(tok))) if w.isalpha() and w[:1].isupper()})
    made = [dict(c, case_id=100_000 + i, subject=w, prompt=f"{w} is located in") for i, (c, w) in
            enumerate(zip(cases, words[:30]))]
    return sorted(cases + made, key=lambda c: c["case_id"])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])  # without and with BOS
def test_first_token_cases_have_the_subject_as_first_token(tiny_models, pool, name):
    lm = tiny_models(name)
    by_hand = [c for c in pool if first_token_by_hand(lm, c)]
    assert len(by_hand) >= 20
    assert ids(single.first_token_cases(lm, pool, len(pool))) == ids(by_hand)  # exactly these
    samples = [single.first_token_cases(lm, pool, n, seed=0) for n in (1, 4, 12, 20)]
    assert [len(s) for s in samples] == [1, 4, 12, 20]
    check_nested_sorted_unique(samples)
    assert single.first_token_cases(lm, pool, 12, seed=0) == samples[2]
    assert ids(single.first_token_cases(lm, pool, 12, seed=1)) != ids(samples[2])


def test_quick_sample_on_counterfact(tiny_models):
    """The real call of notebook 02: random cases plus the first-token ones, by case_id, without duplicates."""
    lm = tiny_models("tiny-llama")
    got = single.quick_sample(lm, "counterfact", 5, n_first_token=2, seed=0)
    hits = [c for c in data.load_cases("counterfact") if first_token_by_hand(lm, c)]
    random5 = data.load_cases("counterfact", 5, seed=0)
    extra = set(ids(got)) - set(ids(random5))
    assert set(ids(random5)) <= set(ids(got)) and ids(got) == sorted(set(ids(got)))
    assert extra <= set(ids(hits)) and len(extra) == min(2, len(hits)) - len(set(ids(random5)) & extra) > 0


def test_quick_sample_is_nested_in_both_sizes(tiny_models, pool, monkeypatch):
    lm = tiny_models("tiny-llama")
    monkeypatch.setattr(single.data, "load_cases", lambda dataset, n=None, seed=0: data._take(pool, n, seed))
    grid = {(r, f): single.quick_sample(lm, "counterfact", r, f, seed=0) for r in (0, 5, 50) for f in (0, 3, 10)}
    for (r, f), sample in grid.items():
        assert ids(sample) == sorted(set(ids(sample)))
        randoms, firsts = data._take(pool, r, 0) if r else [], single.first_token_cases(lm, pool, f, 0) if f else []
        assert ids(sample) == sorted(set(ids(randoms)) | set(ids(firsts)))
        for r2, f2 in grid:
            if r2 >= r and f2 >= f:
                assert set(ids(sample)) <= set(ids(grid[r2, f2]))
    assert len(grid[50, 10]) < 60  # random and first-token cases overlapped, and were counted once
    assert grid[0, 0] == [] and len(grid[0, 10]) == 10
    assert single.quick_sample(lm, "counterfact", 5, 3, seed=0) == grid[5, 3]
    assert ids(single.quick_sample(lm, "counterfact", None, 0)) == ids(pool)


def test_tiny_tokenizer_without_data_raises_missing_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITCOLLAPSE_DATA", str(tmp_path))
    with pytest.raises(MissingDataError, match=r"missing data file .*ME-PPL_1k.json: the tiny test models"):
        tiny_tokenizer.__wrapped__()  # past the cache, which holds the tokenizer from the real data/


def test_the_first_token_memo_gives_what_a_fresh_check_gives(tiny_models):
    """subject_is_first_token remembers its answer per tokenizer, BOS rule, prompt and subject: a second model with
    the same tokenizer but the other BOS rule is asked again, and a cleared memo gives the same answers again."""
    import dataclasses

    lm = tiny_models("tiny-llama")
    cases = data.load_counterfact(n=300, seed=4) + [dict(case_id=-1, prompt="A is in", subject="A", target_new="B")]
    first = [single.subject_is_first_token(lm, c) for c in cases]
    with_bos = dataclasses.replace(lm, spec=dataclasses.replace(lm.spec, prepend_bos=not lm.spec.prepend_bos))
    other = [single.subject_is_first_token(with_bos, c) for c in cases]
    assert 0 < sum(first) < len(cases) and other == first  # BOS shifts both the subject and the first position
    single._FIRST_TOKEN.clear()
    assert [single.subject_is_first_token(lm, c) for c in cases] == first
    assert [single.subject_is_first_token(with_bos, c) for c in cases] == other
