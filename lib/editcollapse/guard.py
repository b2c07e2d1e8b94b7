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

`key_features` reads the keys where the editor says they are (`editor.key_site(lm)`), for many
requests in one batched pass (`models.keys.context_keys`). `Guarded(editor, guard="refuse" | "warn" |
"switch")` wraps a key-based editor: a risky request is refused (EditError, model untouched), warned
about, or edited with the fallback (two-key ROME or C-ROME where the editor offers them, or prefixed keys for
any editor).
The CounterFact screen and HardCF are in `hardcases.hardcf`; the command line is
`python -m editcollapse.cli.guard` (docs/guard.md).
"""
from __future__ import annotations

import hashlib
import math
import numbers
import warnings

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data
from .editors import ROME, EditError, EditRequest, Editor
from .editors.base import EditResult
from .models.keys import KeySite, context_keys
from .models.loading import LoadedModel
from .models.prefixes import ContextPrefixes
from .results.labels import COLLAPSE_THRESHOLD, is_collapsed
from .results.query import select

MODES = ("refuse", "warn", "switch")
FEATURES = ("denominator", "denominator_raw", "gain", "cosine", "k_u_norm", "k_bar_norm",
            "subject_start", "subject_position", "subject_tokens")
# Score thresholds calibrated (best F2 on a calibration half of measured ROME edits, all context templates) by
# `python -m editcollapse.cli.guard`; see docs/guard.md and data/hardcf/SOURCE.md. Keyed (model, mom2_adjustment).
THRESHOLDS: dict[tuple[str, bool], float] = {
    ("smollm2-135m", False): 0.5832,  # uᵀk^u < 0.558; 117 calibration edits (40 collapse)
    ("smollm2-135m", True): -3.4450,  # C over 100k WikiText-2 tokens: uᵀk^u < 31.3; 13 calibration edits (8 collapse)
}
DEFAULT_THRESHOLD = -math.log(0.5)  # uncalibrated models: uᵀk^u below 0.5 (SmolLM2's normal edits: ~35)


class CollapseWarning(UserWarning):
    """A guarded edit was applied although the guard scored it as likely to collapse the model."""


def reads_keys(editor: Editor) -> bool:
    """Whether `editor` is key-based: it says where its keys are (`editor.key_site(lm)`)."""
    return callable(getattr(editor, "key_site", None))


def key_site(lm: LoadedModel, editor: Editor | None = None) -> KeySite:
    """Where `editor` (default: ROME with the model's preset) reads its keys: `editor.key_site(lm)`.
    EditError for an editor that does not say (one that is not key-based)."""
    editor = ROME() if editor is None else editor
    if not reads_keys(editor):
        raise EditError(f"the collapse guard reads the keys of key-based editors (ROME, C-ROME, MEMIT, AlphaEdit); "
                        f"editor {getattr(editor, 'name', editor)!r} has no key_site")
    return editor.key_site(lm)


def mom2_of(lm: LoadedModel, editor: Editor | None) -> bool:
    site_editor = ROME() if editor is None else editor
    return bool(getattr(site_editor.hparams_for(lm), "mom2_adjustment", True))


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
    prefixes = ContextPrefixes(lm, site.contexts, site.layers, cached=len(items) > 1)
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
    """The measured label (`results.labels.is_collapsed`): ME-PPL above `threshold` and above 2× the unedited
    perplexity, `ppl_original` or each row's ppl / ppl_ratio (neither: the threshold alone)."""
    ppl = rows.ppl.astype(float)
    if ppl_original is None and "ppl_ratio" in rows:
        return is_collapsed(ppl, threshold, ppl / rows.ppl_ratio.astype(float))
    return is_collapsed(ppl, threshold, ppl_original or None)


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
    return select(rows, ok=True, experiment=experiment, model=model, editor=editor, dataset=dataset)


def assess(lm: LoadedModel, rows: pd.DataFrame, editor: Editor | None = None, cases: dict | None = None,
           beta: float = 2.0, features: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """The guard on measured single edits (`sweep_of` rows): `features` of their cases (e.g. a screen's; None:
    read afresh), threshold on the calibration split (the model's default where no calibration edit collapsed),
    metrics on the other cases only. Returns (labelled frame, metrics dict with threshold, threshold_u_k (uᵀk^u
    at the threshold), calibrated, held_out (evaluate), calibration (evaluate), per-feature AUROC)."""
    if features is None:
        cases = cases or {c["case_id"]: c for c in data.load_counterfact()}
        features = key_features(lm, [cases[int(i)] for i in rows.case_id], editor)
    lab = label_rows(rows, features)
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


# ---------------------------------------------------------------- the guard around an editor
class Guarded(Editor):
    """`editor` behind the collapse guard: a request whose score exceeds `threshold` is

    - "refuse": refused with an EditError before any weight is written (the model is untouched);
    - "warn": edited anyway, with a CollapseWarning;
    - "switch": edited by `fallback` instead: "rome-2k" (the editor's `two_key()`: k^u and k̄ both map to v*,
      so that the edit can take at the bare prompt without ROME's tiny divisor; the default where the editor
      offers it, as ROME does: on notebook 06's held-out HardCF its bare-prompt efficacy is 0.42 against
      C-ROME's 0.03, collapsing none; in one sequence of those cases it collapses the model by the 4th edit),
      "c-rome" (the editor's `c_rome()`, consistent keys: ME-PPL stays put, in a sequence too, and the edit
      does not take on the bare prompt), "prefix" (the request's prompt behind one of the editor's
      context templates, which is also the result's test-time prefix; any editor with at least one context
      template), or an Editor.

    The edit itself is the editor's (or the fallback's) own `apply`. `threshold` is a finite score (None:
    `threshold_for` the model). A score that is not a number is flagged: the guard cannot vouch for it. The
    result's diagnostics carry guard_score, guard_threshold, guard_flagged, guard_action, guard_editor and
    guard_prompts (the prompts actually edited); its seconds, the guard's.
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
        offers = {name: hasattr(editor, method) for name, method in self.FALLBACKS.items()}
        if fallback is None:
            fallback = "rome-2k" if offers["rome-2k"] else "prefix"
        if isinstance(fallback, str) and fallback not in (*self.FALLBACKS, "prefix"):
            raise EditError(f"fallback must be 'rome-2k', 'c-rome', 'prefix' or an Editor, got {fallback!r}")
        if isinstance(fallback, str) and fallback != "prefix" and not offers[fallback]:
            raise EditError(f"fallback {fallback!r} needs a ROME editor (one with {self.FALLBACKS[fallback]}()), "
                            f"not {editor.name}; use fallback='prefix'")
        self.editor, self.guard, self.threshold, self.fallback = editor, guard, threshold, fallback
        self.batched, self.carries = editor.batched, editor.carries

    @property
    def name(self) -> str:
        return f"{self.editor.name}+guard-{self.guard}"

    def hparams_for(self, lm: LoadedModel):
        """The wrapped editor's settings (what a sequential run's fingerprint records)."""
        return self.editor.hparams_for(lm)

    def edited_layers(self, lm: LoadedModel) -> tuple[int, ...]:
        """The layers that the editor or its fallback may write (checked for NaN and inf before an edit)."""
        return tuple(sorted({*self.editor.edited_layers(lm), *self._fallback_editor().edited_layers(lm)}))

    FALLBACKS = {"rome-2k": "two_key", "c-rome": "c_rome"}  # a named fallback: the editor's method giving it

    def _fallback_editor(self) -> Editor:
        if isinstance(self.fallback, str) and self.fallback in self.FALLBACKS:
            return getattr(self.editor, self.FALLBACKS[self.fallback])()
        return self.editor if self.fallback == "prefix" else self.fallback

    def apply(self, lm: LoadedModel, requests) -> EditResult:
        """Score the requests, then refuse, warn or switch; checked first as every editor's apply checks them."""
        requests = self.checked(lm, requests)
        self.clock = {}
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
                raise EditError(f"{what}; refused, the model is unchanged. Use guard='switch' to edit with "
                                "C-ROME, two-key ROME or a prefix instead")
            if self.guard == "warn":
                warnings.warn(what, CollapseWarning, stacklevel=2)
                action = "warned"
            else:
                editor = self._fallback_editor()
                action = "switched"
                if self.fallback == "prefix":  # one of the editor's context templates, "<text>. {}"
                    prefix = site.contexts[1:][(requests[0].case_id or 0) % (len(site.contexts) - 1)]
                    requests = tuple(EditRequest(prefix.replace("{}", r.template().replace("{}", r.subject)), r.subject,
                                                 r.target_new, r.target_true, r.case_id) for r in requests)
        inner = editor.phase_callbacks  # the wrapped editor's phases reach this guard's callbacks too
        editor.phase_callbacks = (*inner, *self.phase_callbacks)
        try:
            result = editor.apply(lm, requests)
        finally:
            editor.phase_callbacks = inner
        result.editor = self.name
        result.seconds = {**self.clock, **result.seconds, "total": result.seconds["total"] + self.clock["guard"]}
        result.diagnostics.update(guard_score=float(feats.score.max()), guard_threshold=float(threshold),
                                  guard_flagged=bool(flagged.any()), guard_action=action, guard_editor=editor.name,
                                  guard_prompts=[r.prompt for r in requests])
        if prefix is not None:
            result.test_prefix = prefix
        return result


if __name__ == "__main__":  # the old command: say where it went instead of exiting 0 having run nothing
    raise SystemExit("the command line moved: python -m editcollapse.cli.guard")
