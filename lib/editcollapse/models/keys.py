"""Keys k and values W k of an MLP output projection W, and ROME's context templates.

The key k is the input of `spec.mlp_out` at one layer and position; the value is its output
W k (+ bias). An edit reads them at the subject's last token of the prompt, bare (k^u) and
behind N context prefixes; their mean is k̄ ("The Fall of ROME", Sec. 3):

    k̄ = 1/N Σ_i K(x_i ⊕ s)

`read_keys` is the one reader: one forward pass, stopped after the last module read. `edit_keys`
returns all rows: row 0 is the bare prompt (k^u), the mean over rows is k̄, as in ROME's code where
the template "{}" is one of the contexts. `context_keys` reads them for many requests at the
`KeySite` a key-based editor names (`editor.key_site(lm)`): every context prefix runs once
(`prefixes.ContextPrefixes`), each row runs only its own tokens up to the subject's last one, in
batches by length. Used by ROME, MEMIT, AlphaEdit, the key statistics, the guard and the analysis.
"""
from __future__ import annotations

import reprlib
import weakref
from contextlib import ExitStack
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import EditError
from .live import unedited
from .nethook import Trace
from .prefixes import ContextPrefixes
from ..request import EditRequest
from .tokens import pad_ids, subject_last_index, token_budget_batches

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


def read_keys(lm, layers, idxs: list[int], inputs: dict, z_layer: int | None = None):
    """One forward pass of `inputs` (the base model's arguments), stopped after the last module read.

    At one position per row (`idxs`): the key k (input of the MLP output projection W) and the value
    W k (+ b) of each layer in `layers`, and with `z_layer` (>= every layer read) the residual stream
    after that layer. Returns ({layer: K [n, d_k]}, {layer: V [n, d_out]}, z [n, d] or None) as the
    model computes them (its dtype, on its device).
    """
    deepest = None if z_layer is not None else max(layers)
    with torch.no_grad(), ExitStack() as stack:
        traces = {L: stack.enter_context(Trace(lm.model, lm.spec.module("mlp_out", L), retain_input=True,
                                               retain_output=True, stop=L == deepest)) for L in layers}
        if z_layer is not None:
            z = stack.enter_context(Trace(lm.model, lm.spec.module("layer", z_layer), retain_output=True, stop=True))
        lm.model.base_model(**inputs)
    rows, idx = torch.arange(len(idxs), device=lm.device), torch.tensor(idxs, device=lm.device)
    return ({L: t.input[rows, idx] for L, t in traces.items()}, {L: t.output[rows, idx] for L, t in traces.items()},
            z.output[rows, idx] if z_layer is not None else None)


def keys_and_values(lm, layer: int, texts: list[str], idxs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input k and output W k (+ b) of layer `layer`'s MLP output projection at one position per text (float32)."""
    K, V, _ = read_keys(lm, [layer], idxs, lm.encode(texts))
    return K[layer].float(), V[layer].float()


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


# ---------------------------------------------------------------- keys of many requests at once
@dataclass
class KeySite:
    """Where a key-based editor reads its keys: its layers, context templates, C per layer (None: C = I) and
    whether k̄ stands in for k^u (C-ROME's consistent keys). `editor.key_site(lm)` gives an editor's."""

    layers: tuple[int, ...]
    contexts: list[str]
    moments: dict
    consistent: bool = False

    def subset(self, n: int | None) -> "KeySite":
        """The same site with the bare prompt and `n` evenly spaced contexts of this one (None: all)."""
        if n is None or n >= len(self.contexts) - 1:
            return self
        if n < 1:
            raise ValueError(f"n_contexts must be >= 1 or None, not {n}")
        pick = np.linspace(1, len(self.contexts) - 1, n).round().astype(int)
        return replace(self, contexts=[self.contexts[0]] + [self.contexts[i] for i in pick])


def _truncated_rows(lm, request: EditRequest, contexts: list[str]) -> tuple[list[list[int]], int, int]:
    """Token rows of each context ⊕ prompt, cut after the subject's last token (where the key is read).

    The bare template is checked as the editor checks it (`subject_last_index`); since the
    subject must end on a token boundary there, the key at the cut row's last token equals the
    key the editor reads in the whole prompt. Returns (rows, subject's first index, last index).
    """
    tmpl = request.template()
    last = subject_last_index(lm, tmpl, request.subject)
    prefix = tmpl[: tmpl.index("{}")]
    start = len(lm.token_ids(prefix.rstrip(" "))) if prefix.strip() else int(lm.spec.prepend_bos)
    head = prefix + request.subject
    texts = [c.replace("{}", head) for c in contexts]
    ids = lm.tok(texts, add_special_tokens=False)["input_ids"]
    bos = [lm.tok.bos_token_id] if lm.spec.prepend_bos else []
    rows = [bos + list(r) for r in ids]
    lm.check_fits(max(map(len, rows)), f"prompt {request.prompt!r:.80} behind its longest context", EditError)
    return rows, start, last


def _row_keys(lm, layers, rows: list[tuple[int, list[int]]], prefixes: ContextPrefixes,
              batch_tokens: int = 4096) -> dict:
    """Keys at the last token of each (prefix index, own tokens) row, per layer: {layer: [n, d_k]} float32.

    Rows run sorted by length, in batches of about `batch_tokens` positions, so that little is padding.
    """
    pad = lm.tok.pad_token_id if lm.tok.pad_token_id is not None else 0
    out = {L: [None] * len(rows) for L in layers}
    for batch in token_budget_batches([len(r) for _, r in rows], batch_tokens):
        ids, mask = pad_ids([rows[k][1] for k in batch], pad, left=False, device=lm.device)
        inputs = prefixes.inputs(ids, mask, torch.tensor([rows[k][0] for k in batch], device=lm.device))
        K, _, _ = read_keys(lm, layers, [len(rows[k][1]) - 1 for k in batch], inputs)
        for L in layers:
            for k, key in zip(batch, K[L].float()):
                out[L][k] = key
    return {L: torch.stack(v) for L, v in out.items()}


def context_keys(lm, requests: list[EditRequest], site: KeySite, prefixes: ContextPrefixes | None = None):
    """Keys of every request behind every context: ({layer: [n_ok, n_ctx, d_k]}, positions, errors).

    Row 0 of each request is the bare prompt (k^u); the mean over rows is k̄, as `edit_keys`.
    A request the editor would refuse gets its EditError message in `errors`, position None and
    no keys (the keys hold the other requests, in order).
    """
    prefixes = prefixes or ContextPrefixes(lm, site.contexts, site.layers, cached=len(requests) > 1)
    rows, positions, errors = [], [], []
    for r in requests:
        try:
            toks, start, last = _truncated_rows(lm, r, site.contexts)
        except EditError as e:
            positions.append(None)
            errors.append(str(e))
            continue
        rows += [prefixes.split(j, t) for j, t in enumerate(toks)]
        positions.append((start, last))
        errors.append(None)
    if not rows:
        return {}, positions, errors
    keys = _row_keys(lm, site.layers, rows, prefixes)
    return {L: K.view(len(rows) // len(site.contexts), len(site.contexts), -1) for L, K in keys.items()}, \
        positions, errors
