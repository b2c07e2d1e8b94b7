"""Reference scorers: the ground truth the library's batched scoring is tested against, computed by hand.

Each is one unpadded, unbatched forward pass of the raw model (`lm.model`), an explicit log_softmax over
the vocabulary and indexing by position, or greedy decoding without cache. Nothing here calls editcollapse's
scoring, batching or padding code: only the model, its tokenizer and `lm.token_ids` (the BOS rule).
"""
import math

import torch


def logprob_rows(lm, prefix: list[int], cont: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """log p(· | prefix ⊕ cont_<j) for each continuation token j: the log_softmax rows of one forward pass
    of prefix ⊕ cont at positions len(prefix) - 1 ... len(prefix) + len(cont) - 2, shape [len(cont), vocab],
    on the CPU. `dtype`: the logits are cast to it before the log_softmax (None: the model's own)."""
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([prefix + cont], device=lm.device)).logits[0]
    logp = torch.log_softmax(logits if dtype is None else logits.to(dtype), -1)
    return logp[len(prefix) - 1:len(prefix) - 1 + len(cont)].cpu()


def token_logprobs(lm, prefix: list[int], cont: list[int], dtype: torch.dtype | None = None):
    """(log p(cont_j | prefix ⊕ cont_<j) for each j, the argmax token at each of those positions)."""
    rows = logprob_rows(lm, prefix, cont, dtype)
    return rows[torch.arange(len(cont)), torch.tensor(cont, dtype=torch.long)], rows.argmax(-1)


def target_scores(lm, prompt: str, target: str):
    """(mean NLL of " " + target after the prompt, argmax ids, target ids), the target tokenized on its own
    with a leading space and no special tokens, as the edit metrics define it."""
    p, t = lm.token_ids(prompt), lm.tok(" " + target, add_special_tokens=False)["input_ids"]
    logp, pred = token_logprobs(lm, p, t)
    return -sum(x.item() for x in logp) / len(t), pred.tolist(), t


def loglikelihood(lm, ctx: str, cont: str):
    """lm-eval's loglikelihood request by hand: (sum of log p of the extra tokens of token_ids(ctx + cont)
    after token_ids(ctx), whether each of them is the argmax), in float64."""
    ctx_ids = lm.token_ids(ctx)
    cont_ids = lm.token_ids(ctx + cont)[len(ctx_ids):]
    logp, pred = token_logprobs(lm, ctx_ids, cont_ids, torch.float64)
    return sum(x.item() for x in logp), bool((pred == torch.tensor(cont_ids)).all())


def perplexity(lm, text: str, divide_by_all: bool = False) -> float:
    """exp(-(1/n) sum_i log p(x_i | x_<i)) over the tokens after the first, in float64; n the number of
    predicted tokens (`divide_by_all`: the number of input tokens, the wrong normaliser)."""
    ids = lm.token_ids(text)
    logp, _ = token_logprobs(lm, ids[:1], ids[1:], torch.float64)
    n = len(ids) if divide_by_all else len(ids) - 1
    return math.exp(-sum(x.item() for x in logp) / n)


def greedy(lm, prompt: str, max_new_tokens: int, stop, stop_while_decoding: bool = False) -> str:
    """Greedy decoding without cache or padding: argmax, append, repeat; end at EOS (or, with
    `stop_while_decoding`, once the decoded text holds a stop string); cut the text at the first stop."""
    ids, new = lm.token_ids(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tok = int(lm.model(torch.tensor([ids + new], device=lm.device)).logits[0, -1].argmax())
            if tok == lm.tok.eos_token_id:
                break
            new.append(tok)
            if stop_while_decoding and any(s in lm.tok.decode(new) for s in stop):
                break
    text = lm.tok.decode(new, skip_special_tokens=True)
    for s in stop:
        text = text.split(s)[0]
    return text
