"""Collapse guard: predict, before any v* optimisation, whether a key-based edit will collapse the model.

ROME's update ("The Fall of ROME", Sec. 3) is

    Δ = (v* − W k^u) uᵀ / (uᵀ k^u),      u = C⁻¹k̄ (k̄ without mom2_adjustment)

and on any other key k' it adds (v* − W k^u) · uᵀk'/uᵀk^u. When k^u is a first-position key
it lies far from k̄, the denominator uᵀk^u is tiny and every ordinary key is hit
uᵀk̄/uᵀk^u times harder than the edited one: the model collapses. All of it is known once the
keys are read, before v* is optimised and before any perplexity is measured:

- features: the denominator (u/‖u‖)ᵀk^u as ROME reports it, uᵀk^u (`denominator_raw`, the
  divisor of Δ), the gain uᵀk̄/uᵀk^u, cos(k^u, k̄), ‖k^u‖, ‖k̄‖, the subject's first and last
  position and its token count;
- score = −log(uᵀk^u) (+∞ for uᵀk^u ≤ 0): the higher, the likelier a collapse. The divisor itself
  separated the calibration half of SmolLM2's measured edits better than ROME's normalised
  denominator (AUROC 0.96 against 0.91; docs/guard.md);
- the threshold is chosen on a calibration split of measured single edits (`calibrate`) and
  the guard is judged on the other cases only (`evaluate`).

`key_features` reads the keys of many requests in one batched pass: every context prefix runs
once and its attention cache is kept, each row runs only its own tokens up to the subject's
last one, and the pass stops at the edited layer. `screen` scores a whole data set into a
ResultStore (resumable). `Guarded(editor, guard="refuse" | "warn" | "switch")` wraps ROME or
MEMIT: a risky request is refused (EditError, model untouched), warned about, or edited with the
fallback (C-ROME for ROME, or prefixed keys for any editor). `python -m editcollapse.guard`
builds a model's HardCF from the screen (docs/guard.md).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import warnings
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from tqdm.auto import tqdm

from .editors import ROME, EditError, EditRequest, Editor, get_editor
from .models.keys import context_templates
from .models.loading import LoadedModel, pad_ids
from .models.nethook import Trace, TraceDict
from .paths import atomic_write_text, cli_path, in_repo
from .eval.perplexity import COLLAPSE_THRESHOLD
from .models.tokens import subject_last_index

MODES = ("refuse", "warn", "switch")
FEATURES = ("denominator", "denominator_raw", "gain", "cosine", "k_u_norm", "k_bar_norm",
            "subject_start", "subject_position", "subject_tokens")
# Score thresholds calibrated (best F2 on a calibration half of measured ROME edits, all context templates) by
# `python -m editcollapse.guard`; see docs/guard.md and data/hardcf/SOURCE.md. Keyed (model, mom2_adjustment).
THRESHOLDS: dict[tuple[str, bool], float] = {
    ("smollm2-135m", False): 0.5832,  # uᵀk^u < 0.558; 117 calibration edits (40 collapse)
    ("smollm2-135m", True): -3.4450,  # C over 100k WikiText-2 tokens: uᵀk^u < 31.3; 13 calibration edits (8 collapse)
}
DEFAULT_THRESHOLD = -math.log(0.5)  # uncalibrated models: uᵀk^u below 0.5 (SmolLM2's normal edits: ~35)
# Result stores (under results_dir) holding single-edit rows: the notebooks' store and the guard jobs' own.
EDIT_STORES = ("single_edit", "guard_confirm", "guard_eval")


class CollapseWarning(UserWarning):
    """A guarded edit was applied although the guard scored it as likely to collapse the model."""


# ---------------------------------------------------------------- where an editor reads its keys
@dataclass
class KeySite:
    """What a key-based editor uses: its layers, context templates, C per layer (None: C = I) and key choice."""

    layers: tuple[int, ...]
    contexts: list[str]
    moments: dict
    consistent: bool = False  # C-ROME: k̄ in place of k^u

    def subset(self, n: int | None) -> "KeySite":
        """The same site with the bare prompt and `n` evenly spaced contexts of this one (None: all)."""
        if n is None or n >= len(self.contexts) - 1:
            return self
        if n < 1:
            raise ValueError(f"n_contexts must be >= 1 or None, not {n}")
        pick = np.linspace(1, len(self.contexts) - 1, n).round().astype(int)
        return replace(self, contexts=[self.contexts[0]] + [self.contexts[i] for i in pick])


def key_site(lm: LoadedModel, editor: Editor | None = None) -> KeySite:
    """The KeySite of ROME / C-ROME (default: ROME with the model's preset) or MEMIT."""
    editor = ROME() if editor is None else editor
    if isinstance(editor, ROME):
        hp = editor.hparams_for(lm)
        contexts = context_templates(lm, hp.context_template_length_params, hp.seed)
        return KeySite((hp.layer,), contexts, {hp.layer: editor.moment(lm, hp) if hp.mom2_adjustment else None},
                       editor.consistent)
    if type(editor).__name__ == "MEMIT":
        from .editors.memit import moment

        hp = editor.hparams_for(lm)
        contexts = context_templates(lm, hp.context_template_length_params, hp.seed)
        return KeySite(hp.layers, contexts, {L: moment(lm, L, hp.mom2_n_tokens) for L in hp.layers})
    raise EditError(f"the collapse guard reads ROME-style keys; editor {getattr(editor, 'name', editor)!r} is not "
                    "ROME, C-ROME or MEMIT")


def mom2_of(lm: LoadedModel, editor: Editor | None) -> bool:
    site_editor = ROME() if editor is None else editor
    return bool(getattr(site_editor.hparams_for(lm), "mom2_adjustment", True))


# ---------------------------------------------------------------- batched keys
def _truncated_rows(lm: LoadedModel, request: EditRequest, contexts: list[str]) -> tuple[list[list[int]], int, int]:
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


def _select(cache, index: torch.Tensor):
    """A cache object of its own holding the rows `index` of `cache` (the original stays as it is)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in new.layers:
        layer.reorder_cache(index)
    return new


class _Prefixes:
    """The context prefixes, run once up to the deepest key layer; rows continue from their attention cache.

    With `cached=False` (a few requests: the prefix pass would cost more than it saves) every
    row runs whole. The last prefix is empty: for rows that do not start with their context's tokens.
    """

    def __init__(self, lm: LoadedModel, contexts: list[str], layers, cached: bool = True):
        bos = [lm.tok.bos_token_id] if lm.spec.prepend_bos else []
        self.ids = [(lm.token_ids(c[: c.index("{}")].rstrip(" ")) if c.index("{}") else bos) if cached else []
                    for c in contexts] + [[]]
        self.len = torch.tensor([len(p) for p in self.ids], device=lm.device)
        self.cache = None
        if max(self.len):
            pad = lm.tok.pad_token_id if lm.tok.pad_token_id is not None else 0
            ids, self.mask = pad_ids(self.ids, pad, left=True, device=lm.device)
            self.cache = DynamicCache(config=lm.model.config)
            with torch.no_grad(), Trace(lm.model, lm.spec.module("mlp_out", max(layers)), stop=True):
                lm.model.base_model(input_ids=ids, attention_mask=self.mask, cache=self.cache, use_cache=True,
                                    position_ids=(self.mask.cumsum(1) - 1).clamp(min=0))

    def split(self, j: int, row: list[int]) -> tuple[int, list[int]]:
        """(prefix index, the row's own tokens): context j's prefix when the row starts with it, else the empty one."""
        p = self.ids[j]
        if p and row[: len(p)] == p and len(row) > len(p):
            return j, row[len(p):]
        return len(self.ids) - 1, row


def read_keys(lm: LoadedModel, layers, rows: list[tuple[int, list[int]]], prefixes: _Prefixes,
              batch_tokens: int = 4096) -> dict:
    """Keys at the last token of each (prefix index, own tokens) row, per layer: {layer: [n, d_k]} float32.

    Rows run sorted by length, in batches of about `batch_tokens` positions, so that little is padding.
    """
    pad = lm.tok.pad_token_id if lm.tok.pad_token_id is not None else 0
    names = [lm.spec.module("mlp_out", L) for L in sorted(layers)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][1]))
    out = {L: [None] * len(rows) for L in layers}
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * len(rows[order[j]][1]) <= batch_tokens:
            j += 1
        batch = [rows[k] for k in order[i:j]]
        s_ids, s_mask = pad_ids([r for _, r in batch], pad, left=False, device=lm.device)
        pi = torch.tensor([p for p, _ in batch], device=lm.device)
        kwargs = dict(input_ids=s_ids, attention_mask=s_mask)
        if prefixes.cache is not None:
            kwargs.update(attention_mask=torch.cat([prefixes.mask[pi], s_mask], dim=1), use_cache=True,
                          position_ids=prefixes.len[pi][:, None] + torch.arange(s_ids.shape[1], device=lm.device),
                          cache=_select(prefixes.cache, pi))
        with torch.no_grad(), TraceDict(lm.model, names, retain_input=True, stop=True) as td:
            lm.model.base_model(**kwargs)
        last = torch.tensor([len(r) - 1 for _, r in batch], device=lm.device)
        n = torch.arange(len(batch), device=lm.device)
        for L in layers:
            keys = td[lm.spec.module("mlp_out", L)].input[n, last].float()
            for k, key in zip(order[i:j], keys):
                out[L][k] = key
        i = j
    return {L: torch.stack(v) for L, v in out.items()}


def context_keys(lm: LoadedModel, requests: list[EditRequest], site: KeySite, prefixes: _Prefixes | None = None):
    """Keys of every request behind every context: ({layer: [n_ok, n_ctx, d_k]}, positions, errors).

    Row 0 of each request is the bare prompt (k^u); the mean over rows is k̄, as `keys.edit_keys`.
    A request the editor would refuse gets its EditError message in `errors`, position None and
    no keys (the keys hold the other requests, in order).
    """
    prefixes = prefixes or _Prefixes(lm, site.contexts, site.layers, cached=len(requests) > 1)
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
    keys = read_keys(lm, site.layers, rows, prefixes)
    return {L: K.view(len(rows) // len(site.contexts), len(site.contexts), -1) for L, K in keys.items()}, \
        positions, errors


# ---------------------------------------------------------------- features and score
def score_of(denominator) -> np.ndarray:
    """−log(denominator), +∞ where the denominator is ≤ 0: monotone decreasing in it (NaN, no keys, stays NaN).

    The guard's score is score_of(uᵀk^u) (`denominator_raw`)."""
    d = np.asarray(denominator, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isnan(d), np.nan, np.where(d > 0, -np.log(np.where(d > 0, d, 1.0)), np.inf))


def key_geometry(k_u: torch.Tensor, k_bar: torch.Tensor, u: torch.Tensor, consistent: bool = False) -> dict:
    """The denominator and friends for keys k^u, k̄ and u = C⁻¹k̄ ([n, d] each; k̄ in place of k^u for C-ROME)."""
    k_u, k_bar, u = k_u.double(), k_bar.double(), u.double()
    k = k_bar if consistent else k_u
    raw = (u * k).sum(-1)
    return dict(denominator=(raw / u.norm(dim=-1)).tolist(), denominator_raw=raw.tolist(),
                gain=((u * k_bar).sum(-1) / raw).tolist(),
                cosine=F.cosine_similarity(k_u, k_bar, dim=-1).tolist(),
                k_u_norm=k_u.norm(dim=-1).tolist(), k_bar_norm=k_bar.norm(dim=-1).tolist())


def as_request(item) -> EditRequest:
    return item if isinstance(item, EditRequest) else EditRequest.from_case(item)


def key_features(lm: LoadedModel, items, editor: Editor | None = None, batch_size: int = 64,
                 progress: bool = False, site: KeySite | None = None) -> pd.DataFrame:
    """One row per request (EditRequest or case dict): case_id, layer, FEATURES, first_token, score, error.

    A request the editor would refuse gets a row with `error` set and no features. For several
    layers (MEMIT) the row holds the layer with the smallest denominator.
    """
    site = site or key_site(lm, editor)
    items = list(items)
    prefixes = _Prefixes(lm, site.contexts, site.layers, cached=len(items) > 1)
    out = []
    for i in tqdm(range(0, len(items), batch_size), desc="guard keys", disable=not progress, unit="batch"):
        chunk = items[i:i + batch_size]
        requests, rows = [], []
        for item in chunk:
            case_id = item.get("case_id") if isinstance(item, dict) else getattr(item, "case_id", None)
            rows.append(dict(case_id=case_id, error=None))
            try:
                requests.append(as_request(item))
            except EditError as e:
                rows[-1]["error"] = str(e)
        pending = [row for row in rows if row["error"] is None]
        keys, positions, errors = context_keys(lm, requests, site, prefixes) if requests else ({}, [], [])
        geometry = []
        for L, K in keys.items():
            k_u, k_bar = K[:, 0], K.mean(1)
            m = site.moments.get(L)
            u = m.inv_apply(k_bar.double().cpu()).to(k_bar.device) if m is not None else k_bar
            geometry.append(dict(key_geometry(k_u, k_bar, u, site.consistent), layer=[L] * len(K)))
        n = 0
        for row, pos, err in zip(pending, positions, errors):
            if err is not None:
                row["error"] = err
                continue
            best = min(geometry, key=lambda d: d["denominator"][n])
            row.update({k: v[n] for k, v in best.items()})
            start, last = pos
            row.update(subject_start=start, subject_position=last, subject_tokens=last - start + 1,
                       first_token=bool(start == last == int(lm.spec.prepend_bos)))
            n += 1
        out += rows
    return rescore(pd.DataFrame(out))


def rescore(df: pd.DataFrame) -> pd.DataFrame:
    """`df` (key_features or screen rows) with score = score_of(denominator_raw), the guard's score."""
    for col in ("denominator", "denominator_raw"):
        if col not in df:
            df[col] = np.nan
    return df.assign(score=score_of(df.denominator_raw))


def risk(lm: LoadedModel, request, editor: Editor | None = None) -> float:
    """The guard's score of one request (EditRequest or case): −log(uᵀk^u), ROME's divisor, before any edit."""
    row = key_features(lm, [request], editor, batch_size=1).iloc[0]
    if row.error is not None:
        raise EditError(row.error)
    return float(row.score)


def threshold_for(lm: LoadedModel, editor: Editor | None = None) -> float:
    """The calibrated threshold of this model and mom2 setting, or DEFAULT_THRESHOLD."""
    return THRESHOLDS.get((lm.spec.name, mom2_of(lm, editor)), DEFAULT_THRESHOLD)


# ---------------------------------------------------------------- calibration and evaluation
def collapse_labels(rows: pd.DataFrame, ppl_original: float | None = None,
                    threshold: float = COLLAPSE_THRESHOLD) -> pd.Series:
    """The measured label: ME-PPL above `threshold` and above 2× the unedited perplexity."""
    ppl = rows.ppl.astype(float)
    ratio = rows.ppl_ratio.astype(float) if ppl_original is None and "ppl_ratio" in rows else (
        ppl / ppl_original if ppl_original else pd.Series(np.inf, index=rows.index))
    return ((ppl > threshold) | ppl.isna()) & (ratio.fillna(np.inf) > 2)


def calibration_split(case_ids, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """True for the calibration cases: a seeded hash of each case id below `fraction` (stable across runs)."""
    def u(cid):
        h = hashlib.sha256(f"{seed}:{cid}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2 ** 64
    return np.array([u(c) < fraction for c in case_ids], dtype=bool)


def calibrate(scores, labels, beta: float = 2.0) -> float:
    """The threshold with the best F_beta (recall weighted β times) on calibration cases: flagged = score > t.

    Candidates lie halfway between neighbouring distinct scores; ties go to the lower threshold.
    """
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    if not y.any():
        raise ValueError("no collapse case among the calibration cases: nothing to calibrate the threshold on")
    finite = np.unique(s[np.isfinite(s)])
    cands = np.concatenate([[finite[0] - 1.0], (finite[:-1] + finite[1:]) / 2, [finite[-1] + 1.0]])
    best, best_f = cands[0], -1.0
    for t in cands:
        flag = s > t
        tp = (flag & y).sum()
        p, r = tp / max(flag.sum(), 1), tp / y.sum()
        f = (1 + beta ** 2) * p * r / (beta ** 2 * p + r) if tp else 0.0
        if f > best_f:
            best, best_f = t, f
    return float(best)


def evaluate(scores, labels, threshold: float) -> dict:
    """ROC AUC (NaN with one class only), precision, recall and counts of `score > threshold` against labels."""
    from sklearn.metrics import roc_auc_score

    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    flag = s > threshold
    tp, fp, fn = int((flag & y).sum()), int((flag & ~y).sum()), int((~flag & y).sum())
    finite = np.where(np.isfinite(s), s, np.nanmax(s[np.isfinite(s)], initial=0) + 1)
    auroc = float(roc_auc_score(y, finite)) if 0 < y.sum() < len(y) else float("nan")
    return dict(n=len(y), collapse=int(y.sum()), flagged=int(flag.sum()), tp=tp, fp=fp, fn=fn, auroc=auroc,
                precision=tp / (tp + fp) if tp + fp else float("nan"),
                recall=tp / (tp + fn) if tp + fn else float("nan"))


# ---------------------------------------------------------------- the guard around an editor
class Guarded(Editor):
    """`editor` behind the collapse guard: a request whose score exceeds `threshold` is

    - "refuse": refused with an EditError before any weight is written (the model is untouched);
    - "warn": edited anyway, with a CollapseWarning;
    - "switch": edited by `fallback` instead: "c-rome" (ROME's consistent keys, default for ROME),
      "prefix" (the request's prompt behind one of the editor's context templates, which is also the
      result's test-time prefix; any editor with at least one context template), or an Editor.

    `threshold` is a finite score (None: `threshold_for` the model). A score that is not a number is flagged:
    the guard cannot vouch for it. The result's diagnostics carry guard_score, guard_threshold, guard_flagged,
    guard_action, guard_editor and guard_prompts (the prompts actually edited).
    """

    def __init__(self, editor: Editor, guard: str = "refuse", threshold: float | None = None, fallback=None):
        if guard not in MODES:
            raise EditError(f"guard must be one of {MODES}, got {guard!r}")
        if not isinstance(editor, Editor):
            raise EditError(f"Guarded wraps an Editor, got {type(editor).__name__}")
        if isinstance(editor, Guarded):
            raise EditError(f"{editor.name} is guarded already: wrap the bare editor once, "
                            f"Guarded({editor.editor.name}, ...)")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                                      or not math.isfinite(threshold)):
            raise EditError(f"threshold must be a finite number (a score −log uᵀk^u) or None for the model's "
                            f"calibrated one, not {type(threshold).__name__} {threshold!r}")
        threshold = None if threshold is None else float(threshold)
        if fallback is None:
            fallback = "c-rome" if isinstance(editor, ROME) else "prefix"
        if isinstance(fallback, str) and fallback not in ("c-rome", "prefix"):
            raise EditError(f"fallback must be 'c-rome', 'prefix' or an Editor, got {fallback!r}")
        if fallback == "c-rome" and not isinstance(editor, ROME):
            raise EditError(f"fallback 'c-rome' needs a ROME editor, not {editor.name}; use fallback='prefix'")
        self.editor, self.guard, self.threshold, self.fallback = editor, guard, threshold, fallback
        self.batched, self.carries = editor.batched, editor.carries

    @property
    def name(self) -> str:
        return f"{self.editor.name}+guard-{self.guard}"

    def edited_layers(self, lm: LoadedModel) -> tuple[int, ...]:
        """The layers that the editor or its fallback may write (checked for NaN and inf before an edit)."""
        return tuple(sorted({*self.editor.edited_layers(lm), *self._fallback_editor().edited_layers(lm)}))

    def _fallback_editor(self) -> Editor:
        if self.fallback == "c-rome":
            return get_editor("c-rome", hparams=dict(self.editor.hparams), stats=self.editor.stats)
        return self.editor if self.fallback == "prefix" else self.fallback

    def _edit(self, lm: LoadedModel, requests, tx):
        threshold = threshold_for(lm, self.editor) if self.threshold is None else self.threshold
        with self.timed("guard"):
            site = key_site(lm, self.editor)
            feats = key_features(lm, requests, site=site, batch_size=len(requests))
        bad = feats.error.dropna()
        if len(bad):
            raise EditError(bad.iloc[0])
        flagged = ~(feats.score <= threshold)  # NaN is flagged
        action = "edit"
        editor, prefix = self.editor, None
        if flagged.any():
            worst = feats.loc[feats.score.where(flagged).fillna(np.inf).idxmax()]
            score = f"{worst.score:.2f} >" if worst.score > threshold else "NaN (no score) against"
            what = (f"the guard scores {int(flagged.sum())} of {len(requests)} request(s) as likely to collapse "
                    f"{lm.spec.name} (case {worst.case_id}: uᵀk^u {worst.denominator_raw:.3g}, score {score} "
                    f"threshold {threshold:.2f})")
            if self.guard == "refuse":
                raise EditError(f"{what}; refused, the model is unchanged. Use guard='switch' to edit with C-ROME "
                                "or a prefix instead")
            if self.guard == "warn":
                warnings.warn(what, CollapseWarning, stacklevel=3)
                action = "warned"
            else:
                editor = self._fallback_editor()
                action = "switched"
                if self.fallback == "prefix":  # one of the editor's context templates, "<text>. {}"
                    prefix = site.contexts[1:][(requests[0].case_id or 0) % (len(site.contexts) - 1)]
                    requests = tuple(EditRequest(prefix.replace("{}", r.template().replace("{}", r.subject)), r.subject,
                                                 r.target_new, r.target_true, r.case_id) for r in requests)
        editor.clock = self.clock
        diagnostics, test_prefix = editor._edit(lm, requests, tx)
        diagnostics.update(guard_score=float(feats.score.max()), guard_threshold=float(threshold),
                           guard_flagged=bool(flagged.any()), guard_action=action, guard_editor=editor.name,
                           guard_prompts=[r.prompt for r in requests])
        return diagnostics, prefix if prefix is not None else test_prefix


# ---------------------------------------------------------------- screening a data set
def screen(lm: LoadedModel, cases: list[dict], store, editor: Editor | None = None, experiment: str = "guard_screen",
           batch_size: int = 64, n_contexts: int | None = None, progress: bool = True) -> int:
    """Key features and score of every case not yet in `store` (a results_store), batch by batch; returns rows written.

    Rows are keyed (experiment, model, editor, dataset, case_id); a killed screen resumes. With
    `n_contexts`, k̄ is the mean over the bare prompt and that many of the editor's contexts
    (KeySite.subset): cheaper, and calibrated on its own (rows record n_contexts).
    """
    editor = ROME() if editor is None else editor
    ids = dict(experiment=experiment, model=lm.spec.name, editor=editor.name)
    done = store.done()
    pending = [c for c in cases if store.normalize_key((experiment, lm.spec.name, editor.name, c.get("dataset"),
                                                        c["case_id"])) not in done]
    site = key_site(lm, editor).subset(n_contexts)
    ids["n_contexts"] = len(site.contexts) - 1
    written = 0
    with tqdm(total=len(cases), initial=len(cases) - len(pending), desc=f"screen {lm.spec.name}", unit="case",
              disable=not progress) as bar:
        for i in range(0, len(pending), batch_size):
            chunk = pending[i:i + batch_size]
            feats = key_features(lm, chunk, site=site, batch_size=batch_size)
            for case, row in zip(chunk, feats.to_dict("records")):
                store.append(dict(ids, dataset=case.get("dataset"), **row))
                written += 1
            bar.update(len(chunk))
    if hasattr(store, "close"):  # release the writer's lock (stores that take one)
        store.close()
    return written


# ---------------------------------------------------------------- HardCF over a whole data set
def label_rows(rows: pd.DataFrame, features: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Measured single-edit rows joined with guard features by case_id; adds `label` (collapse_labels)
    and `calibration` (calibration_split of the case id). Rows without features are dropped."""
    drop = ["experiment", "editor", "dataset", "model", "error", "first_token", "n_contexts"]
    feats = features[features.error.isna()].drop(columns=drop, errors="ignore")
    out = rows.drop(columns=[c for c in FEATURES + ("score", "layer") if c in rows]).merge(feats, on="case_id")
    out["label"] = collapse_labels(out)
    out["calibration"] = calibration_split(out.case_id, seed=seed)
    return out.reset_index(drop=True)


def sweep_of(rows: pd.DataFrame, model: str, experiment: str = "single_edit_ppl50", editor: str = "rome",
             dataset: str = "counterfact") -> pd.DataFrame:
    """The successful rows of one single-edit sweep."""
    if rows.empty or "ppl" not in rows:
        return rows.iloc[:0]
    return rows[(rows.experiment == experiment) & (rows.model == model) & (rows.editor == editor)
                & (rows.dataset == dataset) & rows.error.isna()].reset_index(drop=True)


def assess(lm: LoadedModel, rows: pd.DataFrame, editor: Editor | None = None, cases: dict | None = None,
           beta: float = 2.0) -> tuple[pd.DataFrame, dict]:
    """The guard on measured single edits (`sweep_of` rows): features read afresh, threshold on the
    calibration split, metrics on the other cases only. Returns (labelled frame, metrics dict with threshold,
    threshold_u_k (uᵀk^u at the threshold), held_out (evaluate), calibration (evaluate), per-feature AUROC)."""
    from . import data

    cases = cases or {c["case_id"]: c for c in data.load_counterfact()}
    feats = key_features(lm, [cases[int(i)] for i in rows.case_id], editor)
    lab = label_rows(rows, feats)
    cal, test = lab[lab.calibration], lab[~lab.calibration]
    t = calibrate(cal.score, cal.label, beta) if cal.label.any() else threshold_for(lm, editor)
    return lab, dict(threshold=t, threshold_u_k=math.exp(-t), calibrated=bool(cal.label.any()),
                     calibration=evaluate(cal.score, cal.label, t), held_out=evaluate(test.score, test.label, t),
                     features=feature_auroc(lab))


def feature_auroc(lab: pd.DataFrame, features=("score", "denominator", "gain", "cosine", "k_u_norm",
                                               "subject_position", "subject_tokens")) -> pd.DataFrame:
    """Held-out ROC AUC of each feature alone; its sign (higher or lower = riskier) is set on the calibration split."""
    from sklearn.metrics import roc_auc_score

    cal, test = lab[lab.calibration], lab[~lab.calibration]
    out = []
    for f in features:
        def auc(part, sign):
            x = sign * part[f].astype(float).replace([np.inf, -np.inf], np.nan)
            x = x.fillna(x.max() + 1 if sign > 0 else x.min() - 1)
            y = part.label.astype(bool)
            return float(roc_auc_score(y, x)) if 0 < y.sum() < len(y) else float("nan")
        sign = 1 if not (auc(cal, 1) < 0.5) else -1
        out.append(dict(feature=f, riskier="higher" if sign > 0 else "lower", auroc_held_out=auc(test, sign)))
    return pd.DataFrame(out)


def confirmation_plan(screened: pd.DataFrame, threshold: float, n_margin: int, random_ids: list[int],
                      max_flagged: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Which screened cases to edit: every flagged one (score > threshold; a seeded sample of
    `max_flagged` when there are more), the `n_margin` highest scores below the threshold, and the
    cases of `random_ids` (a seeded uniform sample of the data set) in the rest. Adds `stratum`."""
    s = screened[screened.error.isna()].sort_values("score", ascending=False).reset_index(drop=True)
    flagged = s.score > threshold
    stratum = np.where(flagged, "flagged", "rest")
    below = np.flatnonzero(~flagged.to_numpy())[:n_margin]
    stratum[below] = "margin"
    s["stratum"] = stratum
    s["edit"] = s.stratum.isin(["flagged", "margin"]) | ((s.stratum == "rest") & s.case_id.isin(random_ids))
    if max_flagged is not None and flagged.sum() > max_flagged:
        keep = s[flagged].sample(max_flagged, random_state=seed).index
        s.loc[flagged & ~s.index.isin(keep), "edit"] = False
    return s


def recall_estimate(plan: pd.DataFrame, measured: pd.DataFrame) -> dict:
    """The screen's recall from the confirmation edits (`measured`: case_id, label).

    Collapses among flagged cases are caught; margin collapses are misses (both scaled up where a
    stratum was not edited whole); the rest's misses are estimated from its uniform random sample
    (rate × size), with a 95 % Clopper-Pearson upper bound. `*_model` does the same with a logistic
    fit of label on score over all edited cases, summed over the cases not edited (model-based).
    """
    from scipy.stats import beta
    from sklearn.linear_model import LogisticRegression

    m = plan.merge(measured[["case_id", "label"]], on="case_id", how="left")
    counts = {}
    for st in ("flagged", "margin", "rest"):
        part = m[m.stratum == st]
        done = part[part.label.notna() & part.edit]  # planned edits only: the rest's are its uniform sample
        counts[st] = dict(size=len(part), edited=len(done), collapse=int(done.label.astype(bool).sum()))
    f, mg, r = counts["flagged"], counts["margin"], counts["rest"]
    caught = f["collapse"] * (f["size"] / f["edited"]) if f["edited"] else 0.0
    margin = mg["collapse"] * (mg["size"] / mg["edited"]) if mg["edited"] else 0.0
    rate = r["collapse"] / r["edited"] if r["edited"] else float("nan")
    upper = float(beta.ppf(0.95, r["collapse"] + 1, r["edited"] - r["collapse"])) if r["edited"] else float("nan")
    missed, missed_hi = margin + rate * r["size"], margin + upper * r["size"]
    x = m.score.astype(float).to_numpy()
    x = np.where(np.isfinite(x), x, np.nanmax(x[np.isfinite(x)]) + 1)[:, None]
    done = m.label.notna().to_numpy()
    y = m.label[done].astype(bool).to_numpy()
    p = (LogisticRegression().fit(x[done], y).predict_proba(x[~done])[:, 1] if 0 < y.sum() < len(y)
         else np.full((~done).sum(), float(y.mean()) if len(y) else np.nan))
    flagged_left = (m.stratum[~done] == "flagged").to_numpy()
    caught_model = f["collapse"] + p[flagged_left].sum()
    missed_model = mg["collapse"] + r["collapse"] + p[~flagged_left].sum()
    return dict(strata=counts, caught=caught, missed_estimate=missed, missed_upper95=missed_hi,
                recall=caught / (caught + missed) if caught + missed else float("nan"),
                recall_lower95=caught / (caught + missed_hi) if caught + missed_hi else float("nan"),
                precision=f["collapse"] / f["edited"] if f["edited"] else float("nan"),
                caught_model=float(caught_model), missed_model=float(missed_model),
                recall_model=float(caught_model / (caught_model + missed_model)))


def write_hardcf(path, confirmed: pd.DataFrame, cases: dict[int, dict], meta: dict) -> list[dict]:
    """The confirmed collapse cases as CounterFact records (data/CounterFact's fields) plus the model, editor,
    ME-PPL_50, the screen's denominator, uᵀk^u and score, first_token and stratum; JSON at `path`."""
    hard = confirmed[confirmed.label.astype(bool)].sort_values("ppl", ascending=False)
    out = [dict({k: v for k, v in cases[int(r.case_id)].items() if k != "dataset"}, model=meta["model"],
                editor=meta["editor"], ppl=float(r.ppl), denominator=float(r.denominator),
                u_k=float(r.denominator_raw), guard_score=float(r.score), first_token=bool(r.first_token),
                stratum=r.stratum) for r in hard.itertuples()]
    atomic_write_text(in_repo(path), json.dumps(out, indent=1, ensure_ascii=False))
    return out


def edit_rows(results_dir="results", stores=EDIT_STORES) -> pd.DataFrame:
    """Single-edit rows of every store in `stores` that exists under `results_dir`; a key in several keeps the first."""
    from .experiments.single import ROW_KEY, results_store

    parts = [results_store(results_dir, n).read() for n in stores if (in_repo(results_dir) / f"{n}.jsonl").exists()]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, ignore_index=True).drop_duplicates(list(ROW_KEY)).reset_index(drop=True)


def sweep_missing(lm: LoadedModel, editor_name: str, cases: list[dict], store, results_dir="results",
                  **sweep) -> int:
    """`single_edit_sweep` into `store` of the cases that no store of EDIT_STORES holds yet (in the given order;
    with retry_errors=True, also those held as error rows only)."""
    from .experiments.single import single_edit_sweep

    rows = edit_rows(results_dir)
    if sweep.get("retry_errors") and not rows.empty:
        rows = rows[rows.error.isna()]
    exp, name = sweep.get("experiment", "single_edit"), get_editor(editor_name, **sweep.get("editor_kwargs", {})
                                                                   or {}).name
    done = set() if rows.empty else set(rows[(rows.experiment == exp) & (rows.model == lm.spec.name)
                                             & (rows.editor == name)].case_id.astype(int))
    todo = [c for c in cases if int(c["case_id"]) not in done]
    if todo:
        single_edit_sweep(lm, editor_name, todo, store, **sweep)
    return len(todo)


def screen_rows(store, experiment: str, model: str) -> pd.DataFrame:
    """The rows of one screen in `store`, rescored (`rescore`)."""
    rows = store.read()
    if rows.empty:
        return rows
    return rescore(rows[(rows.experiment == experiment) & (rows.model == model)].reset_index(drop=True))


def main(argv: list[str] | None = None) -> None:
    """python -m editcollapse.guard: the screen, the labelled sweep, the guard's evaluation, the confirmation
    edits and the HardCF of a model."""
    import argparse
    import time

    from . import data
    from .experiments.single import first_token_cases, results_store
    from .models.loading import load_model
    from .eval.perplexity import me_ppl

    ap = argparse.ArgumentParser(prog="python -m editcollapse.guard", description=main.__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", type=cli_path, default=in_repo("results"), help="(default: the repository's results/)")
    ap.add_argument("--edits", default="single_edit", choices=EDIT_STORES,
                    help="the store new edits go to (edits in any of them are reused)")
    ap.add_argument("--out", type=cli_path, default=None, help="where the HardCF JSON and summary go (default <results>/hardcf; "
                    "the shipped data/hardcf only when named; '' : nowhere)")
    ap.add_argument("--n-labelled", type=int, default=40, help="random CounterFact cases edited for calibration")
    ap.add_argument("--n-first", type=int, default=None, help="first-token cases edited for calibration (all)")
    ap.add_argument("--n-low", type=int, default=0,
                    help="the lowest-uᵀk^u cases of the screen (or of --low-from) edited for calibration")
    ap.add_argument("--low-from", default=None, help="screen experiment that --n-low picks from (this run's)")
    ap.add_argument("--n-random", type=int, default=80,
                    help="uniform sample (seed 0) whose rest-stratum cases are edited")
    ap.add_argument("--n-margin", type=int, default=20, help="highest-scoring cases below the threshold, all edited")
    ap.add_argument("--max-flagged", type=int, default=150)
    ap.add_argument("--max-confirm", type=int, default=None,
                    help="confirmation edits run now at most, in the guard's order (the rest stay unconfirmed)")
    ap.add_argument("--screen-n", type=int, default=None,
                    help="screen a seeded sample of this many cases only (no confirmation, no HardCF)")
    ap.add_argument("--no-screen", action="store_true", help="features of the edited cases only, no screen")
    ap.add_argument("--mom2", action="store_true", help="ROME with mom2_adjustment (C over --mom2-tokens tokens)")
    ap.add_argument("--mom2-tokens", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--screen-contexts", type=int, default=None, help="contexts behind k̄ in the screen (all)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = f"{args.results}/hardcf"

    t0 = time.time()
    lm = load_model(args.model, device=args.device)
    hparams = dict(mom2_adjustment=True, mom2_n_tokens=args.mom2_tokens) if args.mom2 else {}
    suffix = "_mom2" if args.mom2 else ""
    editor = ROME(hparams=hparams)
    experiment = f"single_edit_ppl50{suffix}"
    original = me_ppl(lm, 50, progress=False)["mean"]
    cf = data.load_counterfact()
    by_id = {c["case_id"]: c for c in cf}
    edits = results_store(args.results, args.edits)
    sweep = dict(results_dir=args.results, experiment=experiment, ppl_size=50, ppl_original=original,
                 editor_kwargs=dict(hparams=hparams))
    screen_store = results_store(args.results, "guard_screen")
    screen_exp = f"guard_screen{suffix}" + (f"_ctx{args.screen_contexts}" if args.screen_contexts else "")
    first = first_token_cases(lm, cf, len(cf) if args.n_first is None else args.n_first, seed=0)
    labelled_cases = {c["case_id"]: c for c in first + data.load_counterfact(n=args.n_labelled, seed=0)}
    whole = not args.no_screen and args.screen_n is None
    t1 = time.time()
    if not args.no_screen:
        to_screen = cf if whole else list({c["case_id"]: c for c in data.load_counterfact(n=args.screen_n, seed=0)
                                           + list(labelled_cases.values())}.values())
        screen(lm, to_screen, screen_store, editor, experiment=screen_exp, batch_size=args.batch_size,
               n_contexts=args.screen_contexts)
    screen_seconds = time.time() - t1
    screened = screen_rows(screen_store, screen_exp, lm.spec.name)
    if args.n_low:
        pool = screened if args.low_from is None else screen_rows(screen_store, args.low_from, lm.spec.name)
        if pool.empty:
            raise SystemExit(f"--n-low needs a screen of {lm.spec.name}: none in {screen_store.path}")
        low = pool[pool.error.isna()].sort_values("score", ascending=False).case_id.astype(int)[:args.n_low]
        labelled_cases.update({i: by_id[i] for i in low})
    labelled_cases = sorted(labelled_cases.values(), key=lambda c: c["case_id"])
    print(f"[guard] {lm.spec.name}: ME-PPL_50 {original:.2f}; {len(first)} first-token cases; labelled sweep of "
          f"{len(labelled_cases)} ROME edits{' with mom2' if args.mom2 else ''}; screen {len(screened)} cases",
          flush=True)
    sweep_missing(lm, "rome", labelled_cases, edits, **sweep)
    summary = dict(model=lm.spec.name, editor="rome", mom2_adjustment=args.mom2, ppl_original=original,
                   collapse_rule=f"ME-PPL_50 > {COLLAPSE_THRESHOLD:g} and > 2x the unedited {original:.2f}",
                   score="-log(u^T k^u)", screen_experiment=screen_exp, screen_contexts=args.screen_contexts,
                   screen_seconds_this_run=screen_seconds)
    measured = sweep_of(edit_rows(args.results), lm.spec.name, experiment)
    exact = key_features(lm, [by_id[i] for i in measured.case_id.astype(int)], editor, batch_size=args.batch_size)
    for name, feats in (("guard", exact), ("screen", screened)):
        if feats.empty:
            continue
        lab = label_rows(measured, feats)
        cal = lab[lab.calibration]
        if cal.label.any():
            t, source = calibrate(cal.score, cal.label), "calibrated"
        else:
            t, source = threshold_for(lm, editor), "default: no collapse among the calibration edits"
        summary[name] = dict(threshold_score=t, threshold_u_k=math.exp(-t), threshold_source=source,
                             calibration=evaluate(cal.score, cal.label, t),
                             held_out=evaluate(lab[~lab.calibration].score, lab[~lab.calibration].label, t))
        print(f"[guard] {name}: {summary[name]}", flush=True)
    if whole:
        threshold = summary["screen"]["threshold_score"]
        random_ids = [c["case_id"] for c in data.load_counterfact(n=args.n_random, seed=0)]
        plan = confirmation_plan(screened, threshold, args.n_margin, random_ids, args.max_flagged)
        # flagged and margin in the guard's order (by score), then the rest in the sample's random order, so that
        # an interrupted run leaves a uniform subsample of the rest
        order = plan[plan.edit]
        rest = order[order.stratum == "rest"].set_index("case_id")
        order = pd.concat([order[order.stratum != "rest"],
                           rest.loc[[i for i in random_ids if i in rest.index]].reset_index()])
        todo = [by_id[int(i)] for i in order.case_id]
        done = set(measured.case_id.astype(int))  # no edit ran since it was read
        pending = [c for c in todo if c["case_id"] not in done]
        run_now = pending if args.max_confirm is None else pending[:args.max_confirm]
        print(f"[guard] confirmation: {int((plan.stratum == 'flagged').sum())} flagged, {len(todo)} edits planned, "
              f"{len(todo) - len(pending)} done before, {len(run_now)} to run now", flush=True)
        sweep_missing(lm, "rome", run_now, edits, **sweep)
        measured = label_rows(sweep_of(edit_rows(args.results), lm.spec.name, experiment), screened)
        confirmed = plan.merge(measured[["case_id", "ppl", "label"]], on="case_id")
        summary.update(screened=len(screened), screen_errors=int(screened.error.notna().sum()),
                       first_token_cases=len(first), planned_edits=len(todo),
                       unconfirmed=len(todo) - int(plan[plan.edit].case_id.isin(measured.case_id).sum()),
                       **recall_estimate(plan, measured))
        if args.out:
            hard = write_hardcf(f"{args.out}/{lm.spec.name}{suffix}.json", confirmed, by_id,
                                dict(model=lm.spec.name, editor="rome"))
            summary["hardcf_size"] = len(hard)
    summary["seconds"] = time.time() - t0
    print("[guard] " + json.dumps(summary, default=float), flush=True)
    if args.out:
        atomic_write_text(in_repo(f"{args.out}/{lm.spec.name}{suffix}.summary.json"),
                          json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()
