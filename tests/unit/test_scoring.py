"""The teacher-forced scoring primitive against a hand computation on tiny random models."""
import pytest
import torch

from editcollapse.eval.scoring import continuation_logprobs, mean_nll, pack, target_pairs, token_logprobs
from editcollapse.models.tokens import token_budget_batches
from tests import reference

TINY = ["tiny-llama", "tiny-gpt2", "tiny-gemma3"]
PROMPTS = ["The capital of France is", "Danielle Darrieux's mother tongue is", "He spoke",
           "Autonomous University of Madrid, which is located in"]
TARGETS = ["Paris", "English", "guitar and the piano", "Spain"]


@pytest.mark.parametrize("name", TINY)
def test_continuation_logprobs_match_hand_computation_batched_or_one_by_one(tiny_models, name):
    lm = tiny_models(name)
    pairs = target_pairs(lm, PROMPTS, TARGETS)
    assert len({len(p) for p, _ in pairs}) == len(pairs)  # prompts of different lengths share a batch
    with torch.no_grad():
        batched = continuation_logprobs(lm, pairs)
        chunked = continuation_logprobs(lm, pairs, batch_size=3)
        one = [continuation_logprobs(lm, [pair])[0] for pair in pairs]
    for (p, c), b, ch, o in zip(pairs, batched, chunked, one):
        logp, pred = reference.token_logprobs(lm, p, c, torch.float32)
        for lp, pr in (b, ch, o):
            assert lp.shape == (len(c),) and lp.dtype == torch.float32
            torch.testing.assert_close(lp, logp, atol=1e-5, rtol=0)
            assert torch.equal(pr, pred)


def test_pack_lays_out_the_three_inputs(tiny_models):
    lm = tiny_models("tiny-llama")
    pairs = [([5, 6, 7], [8, 9]), ([5], [10])]
    text, forced, prompt = (pack(lm, pairs, inputs=x, extra_rows=[[3, 4]]) for x in ("text", "forced", "prompt"))
    assert text.ids[:2].tolist() == [[5, 6, 7, 8, 9], [5, 10, 2, 2, 2]] and text.mask[1].tolist() == [1, 1, 0, 0, 0]
    assert forced.ids.tolist() == [[5, 6, 7, 8], [5, 2, 2, 2], [3, 4, 2, 2]]
    assert prompt.ids.tolist() == [[5, 6, 7], [5, 2, 2], [3, 4, 2]]
    for b in (text, forced):
        assert (b.rows.tolist(), b.cols.tolist(), b.tokens.tolist()) == ([0, 0, 1], [2, 3, 0], [8, 9, 10])
    assert prompt.cols.tolist() == [2, 2, 0] and text.n_pairs == 2 and len(text.ids) == 3
    with pytest.raises(ValueError, match="inputs must be one of"):
        pack(lm, pairs, inputs="whole")
    with pytest.raises(ValueError, match="pair 0 has 0 prompt"):
        pack(lm, [([], [8])])


def test_mean_nll_is_the_per_pair_mean_and_keeps_the_gradient(tiny_models):
    lm = tiny_models("tiny-gpt2")
    b = pack(lm, target_pairs(lm, PROMPTS, TARGETS))
    emb = lm.model.get_input_embeddings().weight
    emb.requires_grad_(True)
    try:
        logits = lm.model(input_ids=b.ids, attention_mask=b.mask).logits[b.rows, b.cols]
        nll = mean_nll(logits, b)
        (grad,) = torch.autograd.grad(nll.sum(), emb)
    finally:
        emb.requires_grad_(False)
    assert nll.requires_grad and grad.abs().sum() > 0
    logp = token_logprobs(logits.detach(), b)[0]
    expected = torch.stack([-logp[b.rows == i].mean() for i in range(b.n_pairs)])
    torch.testing.assert_close(nll.detach(), expected)


def test_target_pairs_refuse_misshapen_input(tiny_models):
    lm, gpt2 = tiny_models("tiny-llama"), tiny_models("tiny-gpt2")
    with pytest.raises(TypeError, match="not one string"):
        target_pairs(lm, PROMPTS[0], TARGETS[0])
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        target_pairs(lm, PROMPTS[:2], TARGETS[:1])
    with pytest.raises(ValueError, match="no prompts"):
        target_pairs(lm, [], [])
    with pytest.raises(ValueError, match="has no tokens"):
        target_pairs(gpt2, [""], ["Paris"])
    assert target_pairs(lm, [""], ["Paris"])[0][0] == [lm.tok.bos_token_id]


def test_token_budget_batches():
    lengths = [5, 1, 3, 9, 2, 2]
    assert token_budget_batches(lengths, 6) == [[1, 4, 5], [2], [0], [3]]  # 3 x 2 <= 6, then 2 x 3 > 6
    assert token_budget_batches(lengths, 100) == [[1, 4, 5, 2, 0, 3]]
    assert token_budget_batches([], 8) == []
