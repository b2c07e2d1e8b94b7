"""Edit metrics for one edit case (CounterFact or zsRE, the case shape of `data.py`).

Every score teacher-forces a target after a prompt (`scoring.target_pairs`): the prompt is
tokenized with the model's BOS rule (`lm.token_ids`); the target is scored as ``" " + target``
tokenized without specials, as ROME does (`experiments/py/eval_utils_*.py`). With prompt tokens
p_1..p_P and target tokens t_1..t_T, position P-1+j predicts t_j.

Two families of metrics, for the three prompts of a case (edit ``prompt``, ``rephrase_prompt``,
``locality_prompt``):

* probability comparisons, ROME's CounterFact definitions (Meng et al. 2022, ROME's
  ``summarize.py``). With NLL(t | x) = -1/T sum_j log p(t_j | x, t_<j):
  ``efficacy_prob`` = 1[NLL(new | prompt) < NLL(true | prompt)], ``generalization_prob`` the same
  on the rephrase prompt, ``locality_prob`` = 1[NLL(loc_true | loc) < NLL(new | loc)];
  the ``*_magnitude`` variants are exp(-NLL(new)) - exp(-NLL(true)) (reversed for locality).
* token accuracy, EasyEdit's definitions (``test_prediction_acc``) for both data sets, hence the
  papers reproduced here ("The Butterfly Effect", "The Fall of ROME": their efficacy /
  generalization / locality percentages are these; ROME scores zsRE efficacy and paraphrase the
  same way, but its zsRE neighbourhood score compares with the NQ answer instead):
  ``efficacy_acc`` = mean_j 1[argmax p(. | prompt, t_<j) = t_j] for t = target_new,
  ``generalization_acc`` the same on the rephrase prompt, ``locality_acc`` = the fraction of
  positions of the locality answer whose argmax is unchanged from the unedited model (needs the
  `locality_reference` taken before the edit).

The headline keys ``efficacy``, ``generalization``, ``locality`` are the data set's own
convention: the ``*_prob`` values for CounterFact, the ``*_acc`` values for zsRE.
"""
from __future__ import annotations

import math

import torch

from .scoring import continuation_logprobs, target_pairs

CASE_FIELDS = ("prompt", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
               "locality_ground_truth", "dataset")
PROMPT_FIELDS = ("prompt", "rephrase_prompt", "locality_prompt")


def with_prefix(prompt: str, prefix: str | None) -> str:
    """The prompt behind a test-time prefix ("The Fall of ROME": edited ROME tested with a prefix).

    A prefix holding ``{}`` is a template (ROME's context templates, e.g. ``"Text. {}"``) filled
    with the prompt; otherwise the authors' template form ``f"{prefix}. {prompt}"`` is used, as
    their `editor.py` does with a random ROME context template when ``if_prefix`` is set.
    """
    if prefix is None:
        return prompt
    return prefix.replace("{}", prompt) if "{}" in prefix else f"{prefix}. {prompt}"


@torch.no_grad()
def _teacher_forced(lm, prompts: list[str], targets: list[str], batch_size: int = 16):
    """For each (prompt, target): (mean NLL per target token, argmax ids, target ids), by `scoring`."""
    pairs = target_pairs(lm, prompts, targets)
    return [(-logp.mean(), pred, torch.tensor(t))
            for (logp, pred), (_, t) in zip(continuation_logprobs(lm, pairs, batch_size), pairs)]


def target_nll(lm, prompts: list[str], targets: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean NLL per token of ``" " + targets[i]`` after ``prompts[i]`` (ROME's `test_batch_prediction`)."""
    return torch.stack([nll for nll, _, _ in _teacher_forced(lm, prompts, targets, batch_size)])


def target_token_acc(lm, prompts: list[str], targets: list[str], batch_size: int = 16) -> torch.Tensor:
    """Fraction of target tokens that are the argmax under teacher forcing (EasyEdit's token accuracy)."""
    return torch.stack([(pred == t).float().mean() for _, pred, t in _teacher_forced(lm, prompts, targets, batch_size)])


@torch.no_grad()
def predict_next(lm, prompt: str, k: int = 1) -> list[tuple[str, float]]:
    """The k most probable next tokens after `prompt`, as (decoded token, probability), best first."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ids = lm.token_ids(prompt)
    if not ids:
        raise ValueError(f"prompt {prompt!r} has no tokens (model {lm.spec.name} adds no BOS)")
    logits = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0, -1].float()
    if k > len(logits):
        raise ValueError(f"k = {k} is more than the {len(logits)} tokens of {lm.spec.name}'s vocabulary")
    top = logits.softmax(-1).topk(k)
    return [(lm.tok.decode([i]), p) for i, p in zip(top.indices.tolist(), top.values.tolist())]


def _check_case(case: dict) -> None:
    missing = [f for f in CASE_FIELDS if f not in case]
    if missing:
        raise ValueError(f"edit case lacks field(s) {missing}; an edit case has {list(CASE_FIELDS)}")
    for f in ("target_new", "ground_truth", "locality_ground_truth") + PROMPT_FIELDS:
        if not isinstance(case[f], str):
            raise ValueError(f"edit case field {f!r} must be a string, not {type(case[f]).__name__} {case[f]!r:.80}")
    for f in ("target_new", "ground_truth", "locality_ground_truth"):
        if not case[f].strip():
            raise ValueError(f"edit case field {f!r} is empty: {case[f]!r}")
    if case["dataset"] not in ("counterfact", "zsre"):
        raise ValueError(f"unknown edit dataset {case['dataset']!r}; use 'counterfact' or 'zsre'")


def _prompts(case: dict, prefix: str | None, prefix_fields) -> dict[str, str]:
    if isinstance(prefix_fields, str):
        raise TypeError(f"prefix_fields must be a list of prompt fields, e.g. ({prefix_fields!r},), "
                        f"not the string {prefix_fields!r}")
    unknown = set(prefix_fields) - set(PROMPT_FIELDS)
    if unknown:
        raise ValueError(f"prefix_fields {sorted(unknown)} are not prompt fields {PROMPT_FIELDS}")
    return {f: with_prefix(case[f], prefix if f in prefix_fields else None) for f in PROMPT_FIELDS}


def locality_reference(lm, case: dict, prefix: str | None = None, prefix_fields=("prompt",)) -> dict:
    """Argmax predictions of the UNEDITED model on the locality answer positions (take it before editing).

    Pass the same `prefix` / `prefix_fields` as to `edit_metrics` (they matter only if they
    prefix the locality prompt).
    """
    _check_case(case)
    prompt = _prompts(case, prefix, prefix_fields)["locality_prompt"]
    [(_, pred, _)] = _teacher_forced(lm, [prompt], [case["locality_ground_truth"]])
    return {"prompt": prompt, "target": case["locality_ground_truth"], "pred": pred.tolist()}


def edit_metrics(lm, case: dict, reference: dict | None = None, prefix: str | None = None,
                 prefix_fields=("prompt",)) -> dict[str, float]:
    """All edit metrics of one case under the model's current weights (one batched forward).

    Keys: ``efficacy_prob``, ``generalization_prob``, ``locality_prob`` and their ``*_magnitude``
    (ROME), ``efficacy_acc``, ``generalization_acc`` and, when `reference` is given,
    ``locality_acc`` (EasyEdit), the headline ``efficacy``, ``generalization``, ``locality``
    (see the module docstring; zsRE's ``locality`` needs `reference`), and ``p_new``, ``p_true``:
    exp(-NLL) of target_new / ground_truth after the edit prompt (per-token geometric mean).

    `prefix` is a test-time prefix (see `with_prefix`) put before the prompts named in
    `prefix_fields`; the default, the edit prompt only, is what the authors' code does.
    """
    _check_case(case)
    prompts = _prompts(case, prefix, prefix_fields)
    new, true, loc_true = case["target_new"], case["ground_truth"], case["locality_ground_truth"]
    pairs = [("prompt", new), ("prompt", true), ("rephrase_prompt", new), ("rephrase_prompt", true),
             ("locality_prompt", new), ("locality_prompt", loc_true)]
    res = _teacher_forced(lm, [prompts[f] for f, _ in pairs], [t for _, t in pairs])
    nll = [r[0].item() for r in res]
    p = [math.exp(-x) for x in nll]
    acc = [(pred == t).float().mean().item() for _, pred, t in res]
    m = {
        "efficacy_prob": float(nll[0] < nll[1]),
        "generalization_prob": float(nll[2] < nll[3]),
        "locality_prob": float(nll[5] < nll[4]),
        "efficacy_magnitude": p[0] - p[1],
        "generalization_magnitude": p[2] - p[3],
        "locality_magnitude": p[5] - p[4],
        "efficacy_acc": acc[0],
        "generalization_acc": acc[2],
        "p_new": p[0],
        "p_true": p[1],
    }
    if reference is not None:
        if (reference.get("prompt"), reference.get("target")) != (prompts["locality_prompt"], loc_true):
            raise ValueError(f"reference was taken on ({reference.get('prompt')!r}, {reference.get('target')!r}), "
                             f"not on this case's locality prompt and answer ({prompts['locality_prompt']!r}, "
                             f"{loc_true!r}); take it with locality_reference(lm, case, same prefix)")
        m["locality_acc"] = (res[5][1] == torch.tensor(reference["pred"])).float().mean().item()
    kind = "prob" if case["dataset"] == "counterfact" else "acc"
    for name in ("efficacy", "generalization", "locality"):
        if f"{name}_{kind}" in m:
            m[name] = m[f"{name}_{kind}"]
    return m
