"""Keys k and values W k of an MLP output projection W, and ROME's context templates.

The key k is the input of `spec.mlp_out` at one layer and position; the value is its output
W k (+ bias). An edit reads them at the subject's last token of the prompt, bare (k^u) and
behind N context prefixes; their mean is k̄ ("The Fall of ROME", Sec. 3):

    k̄ = 1/N Σ_i K(x_i ⊕ s)

`edit_keys` returns all rows: row 0 is the bare prompt (k^u), the mean over rows is k̄, as in
ROME's code where the template "{}" is one of the contexts. Used by ROME, MEMIT, AlphaEdit,
the key statistics and the collapse analysis alike.
"""
from __future__ import annotations

import reprlib
import weakref

import torch

from ..errors import EditError
from .live import unedited
from .nethook import Trace
from ..request import EditRequest
from .tokens import subject_last_index

_TEMPLATES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
STARTERS = ("The", "Therefore", "Because", "I", "You")


def context_templates(lm, length_params=((5, 10), (10, 10)), seed: int = 0) -> list[str]:
    """["{}"] + model-generated prefixes "<text>. {}" (ROME: top-5 sampling from five starters).

    `length_params` lists (length in tokens, count); sampling is seeded, so templates repeat.
    They are sampled from the unedited model (`live.unedited`), once per live model (cached by the
    model object, not its name), so a sequence of edits keeps the templates of the unedited model,
    as ROME's global cache does, also when it is resumed in a new process on edited weights.
    """
    key = (tuple(map(tuple, length_params)), seed)
    cache = _TEMPLATES.setdefault(lm.model, {})
    if key not in cache:
        out = ["{}"]
        with unedited(lm), torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for length, n in length_params:
                for s in STARTERS:
                    ids = torch.tensor([lm.token_ids(s)], device=lm.device)
                    # `length` tokens in all, starter included (ROME's max_out_len), at least one new one
                    gen = _sample(lm, ids, max_new_tokens=max(1, length + int(lm.spec.prepend_bos) - ids.shape[1]),
                                  num_return_sequences=n // len(STARTERS))
                    for row in gen:
                        text = lm.tok.decode(row, skip_special_tokens=True)
                        out.append(text.replace("{", " ").replace("}", " ") + ". {}")
        cache[key] = out
    return list(cache[key])


def check_template_lengths(length_params) -> tuple[tuple[int, int], ...]:
    """`length_params` as ((length, count), ...), each count a positive multiple of len(STARTERS)
    (one share per starter: another count would silently give fewer templates); else EditError."""
    try:
        lengths = tuple((int(n), int(c)) for n, c in length_params)
    except (TypeError, ValueError):
        lengths = ()
    if not lengths or any(n < 1 or c < len(STARTERS) or c % len(STARTERS) for n, c in lengths):
        raise EditError(f"context_template_length_params must be pairs (length >= 1, count a positive multiple "
                        f"of {len(STARTERS)}, one per starter), got {length_params!r}")
    return lengths


def _sample(lm, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    try:
        return lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                 pad_token_id=lm.tok.pad_token_id, **kwargs)
    except RuntimeError as e:  # e.g. "probability tensor contains either inf, nan or element < 0"
        raise EditError(f"sampling context templates failed; the model's outputs are not finite? ({e})") from e


def keys_and_values(lm, layer: int, texts: list[str], idxs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input k and output W k (+ b) of layer `layer`'s MLP output projection at one position per text."""
    batch = lm.encode(texts)
    with torch.no_grad(), Trace(lm.model, lm.spec.module("mlp_out", layer), retain_input=True,
                                retain_output=True, stop=True) as t:
        lm.model(**batch)
    rows = torch.arange(len(texts), device=lm.device)
    idx = torch.tensor(idxs, device=lm.device)
    return t.input[rows, idx].float(), t.output[rows, idx].float()


def edit_texts(lm, template: str, subject: str, contexts: list[str]) -> tuple[list[str], list[int]]:
    """The prompt template behind each context ("{}" first), filled, and the subject's last index in each.
    EditError when the longest does not fit in the model's positions."""
    filled = [c.format(template) for c in contexts]
    texts = [t.format(subject) for t in filled]
    lm.check_fits(max(len(lm.token_ids(t)) for t in texts), f"prompt {reprlib.repr(template.format(subject))} "
                  "behind its longest context template", EditError)
    return texts, [subject_last_index(lm, t, subject) for t in filled]


def edit_keys(lm, layer: int, template: str, subject: str, contexts: list[str]):
    """Keys and values at the subject's last token behind each context: K[0] = k^u, K.mean(0) = k̄."""
    texts, idxs = edit_texts(lm, template, subject, contexts)
    return keys_and_values(lm, layer, texts, idxs)


def subject_keys(lm, layer: int, cases: list[dict]) -> torch.Tensor:
    """Keys k^u at the last subject token of each case's bare prompt (as ROME computes them), [m, d_k] float64."""
    templates = [EditRequest.from_case(c).template() for c in cases]
    idxs = [subject_last_index(lm, t, c["subject"]) for t, c in zip(templates, cases)]
    keys, _ = keys_and_values(lm, layer, [c["prompt"] for c in cases], idxs)
    return keys.double().cpu()
