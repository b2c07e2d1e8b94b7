"""Downstream tasks that show what a collapsed model has lost, used by Yang et al. (ACL 2024 Findings) to
validate ME-PPL perplexity: PIQA, HellaSwag, MMLU (discriminative); LAMBADA, NQ, SQuAD 2.0 (generative).

The definitions follow EleutherAI's lm-evaluation-harness (v0.4 task configs), re-implemented here on
the shipped data because lm-eval fetches its datasets from the Hugging Face hub:

- Multiple choice (piqa, hellaswag, mmlu): each continuation is scored by
  ll = sum_t log p(cont_t | context, cont_<t); ``acc`` = [argmax_i ll_i == gold] and
  ``acc_norm`` = [argmax_i ll_i / len(choice_i in characters) == gold].
  PIQA "Question: {goal}\\nAnswer:" + " {sol}"; HellaSwag "{activity_label}: {ctx_a} {Ctx_b}" +
  " {ending}" after lm-eval's preprocessing; MMLU zero-shot "The following are multiple choice questions
  (with answers) about {subject}.\\n\\n{question}\\nA. ..\\nD. ..\\nAnswer:" + " A".." D" (acc only).
- LAMBADA (OpenAI): context = passage up to its last space, target = " {last word}";
  ``acc`` = every target token is the argmax (teacher forcing), ``perplexity`` = exp(-mean_items ll).
- NQ-open: lm-eval's "Answer these questions:\\nQ: {question}?\\nA: {answer}" prompt with the first
  ``NQ_SHOTS`` dev questions and their first alias as shots (only the dev split is shipped; they are
  excluded from scoring, lm-eval draws shots from train); greedy decoding of at most
  ``MAX_NEW_TOKENS`` tokens cut at "\\n", "." or "," (lm-eval's stop strings); ``exact_match`` after SQuAD
  normalisation against any alias.
- SQuAD 2.0 (answerable subset, no titles shipped): lm-eval's squadv2 prompt without the title,
  "Background: {context}\\n\\nQuestion: {question}\\n\\nAnswer:", greedy decoding cut at "\\n";
  official SQuAD ``exact_match`` and token ``f1`` (at most ``MAX_NEW_TOKENS`` tokens, lm-eval allows 256).

Tokenization follows lm-eval's HFLM: trailing spaces of the context move to the continuation, and the
continuation's tokens are those of token_ids(context + continuation) past len(token_ids(context)), so the
model's BOS rule applies once, at the front. Accuracies and EM/F1 lie in [0, 1] (lm-eval reports SQuAD
in percent); ``RANDOM_BASELINE`` holds the papers' chance levels.
"""
from __future__ import annotations

import collections
import re
import string

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from . import data
from .models import LoadedModel

TASKS = ("piqa", "hellaswag", "mmlu", "lambada", "nq", "squad2")
RANDOM_BASELINE = {"piqa": 0.5, "hellaswag": 0.25, "mmlu": 0.25, "lambada": 0.0, "nq": 0.0, "squad2": 0.0}
NQ_SHOTS = 5
MAX_NEW_TOKENS = 16
_PUNCT = frozenset(string.punctuation)


# ---------------------------------------------------------------- scoring primitives
def _max_len(lm: LoadedModel) -> int:
    return lm.model.config.max_position_embeddings


@torch.no_grad()
def loglikelihood(lm: LoadedModel, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[tuple[float, bool]]:
    """(sum of log p(continuation tokens | context), every continuation token is the argmax) per pair.

    Inputs are sorted by length and run in right-padded batches; the causal mask keeps padding out of
    every scored position, so the scores match one-at-a-time scoring. Over-long inputs lose their left end.
    """
    rows = []
    for ctx, cont in pairs:
        n_sp = len(ctx) - len(ctx.rstrip())
        if n_sp:
            ctx, cont = ctx[:-n_sp], ctx[-n_sp:] + cont
        ctx_ids = lm.token_ids(ctx)
        cont_ids = lm.token_ids(ctx + cont)[len(ctx_ids):]
        if not cont_ids:
            raise ValueError(f"continuation {cont!r} after context {ctx[-40:]!r} has no tokens of its own")
        ids = (ctx_ids + cont_ids)[-(_max_len(lm) + 1):]
        rows.append((ids[:-1], cont_ids))
    groups: dict[tuple, list[int]] = {}  # same input (" A".." D" after one prompt): one forward serves all
    for i, (inp, _) in enumerate(rows):
        groups.setdefault(tuple(inp), []).append(i)
    uniq = sorted(groups, key=len, reverse=True)
    pad = lm.tok.pad_token_id
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    for b in tqdm(range(0, len(uniq), batch_size), desc="loglikelihood", leave=False):
        batch = uniq[b:b + batch_size]
        span = [max(len(rows[i][1]) for i in groups[inp]) for inp in batch]  # scored positions per input
        width = max(len(inp) for inp in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, inp in enumerate(batch):
            ids[j, :len(inp)] = torch.tensor(inp)
            mask[j, :len(inp)] = 1
        keep = width - min(len(inp) - s for inp, s in zip(batch, span))  # last positions holding any target
        logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                          logits_to_keep=keep).logits.float()
        for j, inp in enumerate(batch):
            end = len(inp) - (width - keep)  # this input's last position, indexed inside the kept slice
            lp_all = torch.log_softmax(logits[j, end - span[j]:end], dim=-1)
            for i in groups[inp]:
                cont = rows[i][1]
                lp = lp_all[span[j] - len(cont):]
                target = torch.tensor(cont, device=lp.device)
                out[i] = (lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
    return out


class _StopStrings(StoppingCriteria):
    """Per row: done once the text generated after column `start` holds a stop string (prompt text ignored)."""

    def __init__(self, tok, start: int, stop: tuple[str, ...]):
        self.tok, self.start, self.stop = tok, start, stop

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tok.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


@torch.no_grad()
def greedy_generate(lm: LoadedModel, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS,
                    stop: tuple[str, ...] = ("\n",), batch_size: int = 16) -> list[str]:
    """Greedy continuation of each prompt, cut before the first stop string (or EOS).

    Prompts are left-padded (positions come from the attention mask in `generate`), sorted by length,
    and lose their left end when longer than the context window minus `max_new_tokens`.
    """
    rows = [lm.token_ids(p)[-(_max_len(lm) - max_new_tokens):] for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    pad = lm.tok.pad_token_id
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                           eos_token_id=lm.tok.eos_token_id)
    out: list[str | None] = [None] * len(rows)
    for b in tqdm(range(0, len(order), batch_size), desc="generate", leave=False):
        batch = [rows[i] for i in order[b:b + batch_size]]
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(batch):
            ids[j, width - len(r):] = torch.tensor(r)
            mask[j, width - len(r):] = 1
        gen = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), generation_config=cfg,
                                stopping_criteria=StoppingCriteriaList([_StopStrings(lm.tok, width, stop)]))
        for j, text in enumerate(lm.tok.batch_decode(gen[:, width:], skip_special_tokens=True)):
            for s in stop:
                text = text.split(s)[0]
            out[order[b + j]] = text
    return out


# ---------------------------------------------------------------- metrics
def mc_correct(lls: list[float], choices: list[str], label: int) -> tuple[bool, bool]:
    """(acc, acc_norm) of one multiple-choice item: argmax of ll, and of ll / len(choice) in characters."""
    lls_t = torch.tensor(lls, dtype=torch.float64)
    lens = torch.tensor([float(len(c)) for c in choices], dtype=torch.float64)
    return int(lls_t.argmax()) == label, int((lls_t / lens).argmax()) == label


def squad_normalize(s: str) -> str:
    """Official SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def squad_em(prediction: str, golds: str | list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    golds = [golds] if isinstance(golds, str) else golds
    return float(any(squad_normalize(prediction) == squad_normalize(g) for g in golds))


def squad_f1(prediction: str, golds: str | list[str]) -> float:
    """Official SQuAD token F1 (bag of normalised tokens), the max over gold answers."""
    golds = [golds] if isinstance(golds, str) else golds
    pred = squad_normalize(prediction).split()
    best = 0.0
    for g in golds:
        gold = squad_normalize(g).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if same:
            p, r = same / len(pred), same / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


# ---------------------------------------------------------------- task formats (lm-eval's)
def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning of WikiHow artefacts."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def piqa_item(doc: dict) -> tuple[str, list[str], int]:
    return f"Question: {doc['goal']}\nAnswer:", doc["choices"], doc["label"]


def hellaswag_item(doc: dict) -> tuple[str, list[str], int]:
    query = hellaswag_preprocess(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
    return query, [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"])


def mmlu_item(doc: dict) -> tuple[str, list[str], int]:
    options = "".join(f"{letter}. {c}\n" for letter, c in zip("ABCD", doc["choices"]))
    prompt = (f"The following are multiple choice questions (with answers) about "
              f"{doc['subject'].replace('_', ' ')}.\n\n{doc['question'].strip()}\n{options}Answer:")
    return prompt, list("ABCD"), doc["label"]


def lambada_item(text: str) -> tuple[str, str]:
    """(passage without its last word, " " + last word)."""
    ctx, _, word = text.rpartition(" ")
    return ctx, " " + word


def nq_prompt(question: str, shots: list[dict]) -> str:
    examples = "".join(f"Q: {s['question']}?\nA: {s['answer'][0]}\n" for s in shots)
    return f"Answer these questions:\n{examples}Q: {question}?\nA:"


def squad_prompt(doc: dict) -> str:
    return f"Background: {doc['context']}\n\nQuestion: {doc['question']}\n\nAnswer:"


# ---------------------------------------------------------------- evaluation
_MC = {"piqa": (data.load_piqa, piqa_item), "hellaswag": (data.load_hellaswag, hellaswag_item),
       "mmlu": (lambda n, seed: data.load_mmlu("test", n, seed), mmlu_item)}


def _multiple_choice(lm, task, n, seed, batch_size):
    loader, fmt = _MC[task]
    items = [fmt(d) for d in loader(n=n, seed=seed)]
    pairs = [(ctx, " " + c) for ctx, choices, _ in items for c in choices]
    lls = iter(ll for ll, _ in loglikelihood(lm, pairs, batch_size))
    hits = [mc_correct([next(lls) for _ in choices], choices, label) for _, choices, label in items]
    res = {"acc": sum(a for a, _ in hits) / len(hits)}
    if task != "mmlu":
        res["acc_norm"] = sum(b for _, b in hits) / len(hits)
    return res | {"n": len(hits)}


def _lambada(lm, n, seed, batch_size):
    scores = loglikelihood(lm, [lambada_item(t) for t in data.load_lambada(n=n, seed=seed)], batch_size)
    mean_ll = sum(ll for ll, _ in scores) / len(scores)
    return {"acc": sum(g for _, g in scores) / len(scores),
            "perplexity": float(torch.tensor(-mean_ll, dtype=torch.float64).exp()), "n": len(scores)}


def _nq(lm, n, seed, batch_size):
    rows = data.load_nq()
    shots, pool = rows[:NQ_SHOTS], data._take(rows[NQ_SHOTS:], n, seed)
    preds = greedy_generate(lm, [nq_prompt(r["question"], shots) for r in pool], MAX_NEW_TOKENS,
                            ("\n", ".", ","), batch_size)
    return {"exact_match": sum(squad_em(p, r["answer"]) for p, r in zip(preds, pool)) / len(pool), "n": len(pool)}


def _squad2(lm, n, seed, batch_size):
    docs = data.load_squad2(n=n, seed=seed)
    preds = greedy_generate(lm, [squad_prompt(d) for d in docs], MAX_NEW_TOKENS, ("\n",), batch_size)
    return {"exact_match": sum(squad_em(p, d["answer"]) for p, d in zip(preds, docs)) / len(docs),
            "f1": sum(squad_f1(p, d["answer"]) for p, d in zip(preds, docs)) / len(docs), "n": len(docs)}


def evaluate(lm: LoadedModel, task: str, n: int | None = None, seed: int = 0, batch_size: int = 16) -> dict:
    """Metrics of one task on `n` items (a seeded sample, the same for every model; all when None)."""
    if task not in TASKS:
        raise ValueError(f"unknown downstream task {task!r}; known tasks: {', '.join(TASKS)}")
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive number of items or None (all), not {n!r}")
    if task in _MC:
        return _multiple_choice(lm, task, n, seed, batch_size)
    return {"lambada": _lambada, "nq": _nq, "squad2": _squad2}[task](lm, n, seed, batch_size)


def evaluate_all(lm: LoadedModel, tasks: tuple[str, ...] | list[str] = TASKS, n: int | None = 200, seed: int = 0,
                 batch_size: int = 16) -> pd.DataFrame:
    """Tidy table (task, metric, value, n) of every task's metrics."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown downstream task(s) {unknown}; known tasks: {', '.join(TASKS)}")
    rows = []
    for task in (bar := tqdm(tasks, desc="downstream")):
        bar.set_postfix(task=task)
        res = evaluate(lm, task, n, seed, batch_size)
        rows += [dict(task=task, metric=k, value=v, n=res["n"]) for k, v in res.items() if k != "n"]
    return pd.DataFrame(rows, columns=["task", "metric", "value", "n"])
