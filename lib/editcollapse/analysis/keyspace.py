"""Why ROME collapses, in the space of keys ("The Fall of ROME", Sec. 3-4).

- `case_keys` / `project`: k^u, k̄ and C⁻¹k̄ of edit cases, and PCA / t-SNE of them (scikit-learn),
  as tidy frames (one row per vector: its labels, kind, x, y).
- `position_profile`, `first_position_keys`: hidden-state and key norms per position of ordinary
  text, and keys at the first position against the others (the first-token anomaly).
- `with_bos`: the same live model with a BOS-like token put before every text (SmolLM2 has none).
- C gathered in different ways: `line_moments` (one sequence per WikiText line, with the
  first-position keys kept apart), `mix_first` (C with a chosen share of first-position keys),
  `first_share_of` (how much of C's keys sit at a first position) and `rome_under_moments` (one
  v* per case, the update Δ = (v* − W k^u)(C⁻¹k̄)ᵀ / ((C⁻¹k̄)ᵀk^u) under each C, perplexity each).
- `second_to_first`: GPT-2's learned position 0 replaced by position 1 (the paper's Second2First);
  `position_shift_effect`: for rotary models shifting every position changes nothing (relative
  positions), which is why Second2First has no rotary counterpart.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import guard
from ..editors import ROME, EditRequest, edited
from ..editors.base import WeightTransaction, param_delta
from ..editors.rome import rank_one_update
from ..models.keys import context_keys, edit_keys
from ..models.loading import LoadedModel
from ..models.nethook import Trace, TraceDict, get_module
from ..eval.metrics import edit_metrics, locality_reference
from ..eval.perplexity import me_ppl
from ..results.tables import HEADLINE
from ..models.stats import Moment
from ..models.tokens import pad_ids, token_budget_batches

KINDS = ("k_u", "k_bar", "C_inv_k")


# ---------------------------------------------------------------- keys of edit cases, projected
def case_keys(lm: LoadedModel, cases: list[dict], editor: ROME | None = None, moment: Moment | None = None,
              batch_size: int = 64) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """(labels: one row per case with case_id, first_token, subject_position, denominator; {kind: [n, d_k]}).

    Kinds: k^u (bare prompt), k̄ (mean over the editor's contexts) and C⁻¹k̄ with `moment` (default:
    the editor's C, or k̄ itself when mom2_adjustment is off). Cases the editor refuses are left out.
    """
    site = guard.key_site(lm, editor)
    layer = site.layers[0]
    moment = moment if moment is not None else site.moments.get(layer)
    labels, ku, kb = [], [], []
    for i in range(0, len(cases), batch_size):
        chunk = cases[i:i + batch_size]
        keys, positions, errors = context_keys(lm, [EditRequest.from_case(c) for c in chunk], site)
        ok = [(c, p) for c, p, e in zip(chunk, positions, errors) if e is None]
        if ok:
            K = keys[layer].double().cpu()
            ku.append(K[:, 0])
            kb.append(K.mean(1))
            labels += [dict(case_id=c["case_id"], subject=c["subject"], subject_start=s, subject_position=p,
                            first_token=bool(s == p == int(lm.spec.prepend_bos))) for c, (s, p) in ok]
    k_u, k_bar = torch.cat(ku), torch.cat(kb)
    u = moment.inv_apply(k_bar) if moment is not None else k_bar
    frame = pd.DataFrame(labels)
    frame = frame.assign(**{k: v for k, v in guard.key_geometry(k_u, k_bar, u).items()})
    return frame, dict(k_u=k_u.numpy(), k_bar=k_bar.numpy(), C_inv_k=u.numpy())


def project(vectors: dict[str, np.ndarray], labels: pd.DataFrame, method: str = "pca", normalize: bool = True,
            seed: int = 0) -> pd.DataFrame:
    """2-D PCA or t-SNE of every kind's vectors together: one row per (kind, row of `labels`) with x, y.

    `normalize` scales each vector to unit length first (only directions enter the denominator's
    cosine, and C⁻¹k̄ lives on another scale than the keys). The frame's attrs hold the PCA's
    explained variance ratio.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    kinds = list(vectors)
    if any(len(vectors[k]) != len(labels) for k in kinds):
        raise ValueError(f"every kind needs one vector per label row ({len(labels)}): "
                         f"{ {k: len(v) for k, v in vectors.items()} }")
    X = np.concatenate([np.asarray(vectors[k], dtype=float) for k in kinds])
    if normalize:
        X = X / np.linalg.norm(X, axis=1, keepdims=True).clip(1e-12)
    if method == "pca":
        model = PCA(n_components=2, random_state=seed)
        xy = model.fit_transform(X)
    elif method == "tsne":
        model = TSNE(n_components=2, perplexity=min(30.0, max(2.0, (len(X) - 1) / 3)), init="pca", random_state=seed)
        xy = model.fit_transform(X)
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', not {method!r}")
    out = pd.concat([labels.assign(kind=k) for k in kinds], ignore_index=True)
    out["x"], out["y"] = xy[:, 0], xy[:, 1]
    if method == "pca":
        out.attrs["explained_variance_ratio"] = model.explained_variance_ratio_.tolist()
    return out


# ---------------------------------------------------------------- the first position of ordinary text
def with_bos(lm: LoadedModel, token: str | None = None) -> LoadedModel:
    """The same live model with `token` (default "<|endoftext|>", the document separator, else BOS) put
    before every text by `token_ids` / `encode`; its spec is named "<model>+bos"."""
    tok = copy.deepcopy(lm.tok)
    vocab = tok.get_vocab()
    token = token or ("<|endoftext|>" if "<|endoftext|>" in vocab else tok.bos_token)
    if token not in vocab:
        raise ValueError(f"{token!r} is not a token of {lm.spec.name}")
    tok.bos_token = token
    return LoadedModel(lm.model, tok, replace(lm.spec, name=f"{lm.spec.name}+bos", prepend_bos=True))


def _specials(lm: LoadedModel) -> int:
    return int(lm.spec.prepend_bos)


def position_profile(lm: LoadedModel, texts: list[str], layers: list[int], max_len: int = 32) -> pd.DataFrame:
    """Norms of the hidden state (output of each layer in `layers`) and of the key (input of that layer's
    MLP output projection) at every position of each text (first `max_len` tokens).

    Columns: text, layer, position (0 = first text token; −1 = a BOS before it), token ("BOS"/"text"),
    hidden_norm, key_norm.
    """
    rows = [lm.token_ids(t)[:max_len + _specials(lm)] for t in texts]
    pad = lm.tok.pad_token_id if lm.tok.pad_token_id is not None else 0
    ids, mask = pad_ids(rows, pad, device=lm.device)
    layers = sorted(layers)
    hid = [lm.spec.module("layer", L) for L in layers]
    keys = [lm.spec.module("mlp_out", L) for L in layers]
    with torch.no_grad(), TraceDict(lm.model, keys, retain_input=True) as tk, \
            TraceDict(lm.model, hid, retain_output=True, stop=True) as th:
        lm.model.base_model(input_ids=ids, attention_mask=mask)
    out = []
    m = mask.bool().cpu()
    for L, h, k in zip(layers, hid, keys):
        hn = th[h].output.float().norm(dim=-1).cpu()
        kn = tk[k].input.float().norm(dim=-1).cpu()
        for i in range(len(rows)):
            for j in range(int(m[i].sum())):
                out.append(dict(text=i, layer=L, position=j - _specials(lm),
                                token="BOS" if j < _specials(lm) else "text",
                                hidden_norm=float(hn[i, j]), key_norm=float(kn[i, j])))
    return pd.DataFrame(out)


def first_position_keys(lm: LoadedModel, texts: list[str], layer: int, max_len: int = 32,
                        n_other: int = 4, seed: int = 0) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Keys of ordinary text at its first token against `n_other` random later positions per text.

    Returns (labels: text, position, where ∈ {"first", "other"}; {"key": [n, d_k]}) for `project`.
    """
    rows = [lm.token_ids(t)[:max_len + _specials(lm)] for t in texts]
    pad = lm.tok.pad_token_id if lm.tok.pad_token_id is not None else 0
    ids, mask = pad_ids(rows, pad, device=lm.device)
    with torch.no_grad(), Trace(lm.model, lm.spec.module("mlp_out", layer), retain_input=True, stop=True) as t:
        lm.model(input_ids=ids, attention_mask=mask)
    rng = np.random.default_rng(seed)
    first = _specials(lm)
    labels, vecs = [], []
    for i, r in enumerate(rows):
        later = list(range(first + 1, len(r)))
        picks = [first] + sorted(rng.choice(later, size=min(n_other, len(later)), replace=False).tolist())
        for j in picks:
            labels.append(dict(text=i, position=j - first, where="first" if j == first else "other"))
            vecs.append(t.input[i, j].double().cpu())
    return pd.DataFrame(labels), {"key": torch.stack(vecs).numpy()}


# ---------------------------------------------------------------- how C is gathered
def line_moments(lm: LoadedModel, layer: int, lines: list[str], max_len: int = 1024,
                 batch_tokens: int = 4096) -> dict[str, Moment]:
    """C from one sequence per line: {"lines": all positions, "lines_skip_first": without position 0,
    "first": position-0 keys only}, in one pass (float64). Each Moment's meta has count and first_share."""
    module = lm.spec.module("mlp_out", layer)
    seqs = [r for r in (lm.token_ids(x)[:max_len] for x in lines if x.strip()) if len(r) > _specials(lm)]
    pad = lm.tok.pad_token_id if lm.tok.pad_token_id is not None else 0
    first = _specials(lm)
    S_all = S_first = None
    n_all = n_first = 0
    with tqdm(total=sum(map(len, seqs)), unit="tok", unit_scale=True, desc=f"C per line {module}") as bar:
        for idx in token_budget_batches([len(r) for r in seqs], batch_tokens):
            ids, mask = pad_ids([seqs[i] for i in idx], pad, device=lm.device)
            with torch.no_grad(), Trace(lm.model, module, retain_input=True, stop=True) as t:
                lm.model(input_ids=ids, attention_mask=mask)
            k = t.input.double()
            m = mask.bool()
            if first:
                m[:, :first] = False  # a BOS is never a key of the corpus text (C keeps it, see stats)
            k_all, k_first = k[m], k[:, first]
            S_all = k_all.T @ k_all if S_all is None else S_all + k_all.T @ k_all
            S_first = k_first.T @ k_first if S_first is None else S_first + k_first.T @ k_first
            n_all, n_first = n_all + len(k_all), n_first + len(k_first)
            bar.update(int(mask.sum()))
    meta = dict(model=lm.spec.name, layer=layer, module=module, corpus="wikitext lines", max_len=max_len)

    def moment(S, n, share):
        C = (S / n).cpu()
        return Moment((C + C.T) / 2, dict(meta, count=n, first_share=share))

    return {"lines": moment(S_all, n_all, n_first / n_all),
            "lines_skip_first": moment(S_all - S_first, n_all - n_first, 0.0),
            "first": moment(S_first, n_first, 1.0)}


def mix_first(m: Moment, first: Moment, share: float) -> Moment:
    """C' = (1 − share)·C + share·C_first: a C whose keys are `share` first-position keys (on top of C's own)."""
    if not 0 <= share < 1:
        raise ValueError(f"share must be in [0, 1), not {share}")
    C = (1 - share) * m.C + share * first.C
    return Moment(C, dict(m.meta, mixed_first_share=share, first_count=first.count))


def first_share_of(n_tokens: int, seq_len: int, skip_first: bool = False) -> float:
    """Share of first positions among the keys of windows of `seq_len` tokens (stats.corpus_windows)."""
    return 0.0 if skip_first else 1.0 / seq_len if n_tokens >= seq_len else 1.0 / n_tokens


def rome_under_moments(lm: LoadedModel, case: dict, moments: dict[str, Moment | None], ppl_size: int = 50,
                       editor: ROME | None = None) -> list[dict]:
    """ROME's update for one case under each C of `moments` (None: C = I, the papers' setting), with one v*.

    v* does not depend on C (only the update does), so ROME is applied once (without C) for v*, k^u
    and k̄, then Δ = (v* − W k^u)(C⁻¹k̄)ᵀ / ((C⁻¹k̄)ᵀk^u) is written, measured and restored per C.
    Rows: variant, case_id, denominator (normalised as ROME prints it), denominator_raw,
    numerator_norm, delta_norm, ppl, efficacy, generalization, locality (metrics.edit_metrics).
    """
    editor = editor or ROME()
    hp = replace(editor.hparams_for(lm), mom2_adjustment=False)
    request = EditRequest.from_case(case)
    reference = locality_reference(lm, case)
    result = ROME(hparams=dict(editor.hparams, mom2_adjustment=False), fast=editor.fast).apply(lm, request)
    d = result.diagnostics
    result.undo()
    templates = d["context_templates"]
    K, V = edit_keys(lm, hp.layer, request.template(), request.subject, templates)
    v_star, k_u, k_bar, Wk = d["v_star"].to(lm.device), K[0], K.mean(0), V[0]
    rows = []
    for name, m in moments.items():
        u = m.inv_apply(k_bar.double().cpu()).float().to(lm.device) if m is not None else k_bar
        delta, numerator, denominator = rank_one_update(v_star, Wk, k_u, u)
        tx = WeightTransaction(lm)
        try:
            tx.add_(*param_delta(lm, lm.spec.module("mlp_out", hp.layer), delta))
            ppl = me_ppl(lm, ppl_size, progress=False)["mean"]
            quality = {k: v for k, v in edit_metrics(lm, case, reference).items() if k in HEADLINE}
        finally:
            tx.restore()
        rows.append(dict(variant=name, case_id=case["case_id"], denominator=(denominator / u.norm()).item(),
                         denominator_raw=denominator.item(), numerator_norm=numerator.norm().item(),
                         delta_norm=delta.norm().item(), ppl=ppl, **quality))
    return rows


# ---------------------------------------------------------------- positions: Second2First and rotary
@contextmanager
def second_to_first(lm: LoadedModel):
    """Inside the block, position 0 of GPT-2's learned position embedding is position 1's (Second2First);
    restored bit-identically after. Models without learned absolute positions raise ValueError."""
    if lm.spec.pos_embed is None:
        raise ValueError(f"{lm.spec.name} has no learned absolute position embedding (rotary positions): "
                         "Second2First does not apply; see position_shift_effect")
    wpe = get_module(lm.model, lm.spec.pos_embed).weight
    saved = wpe[0].detach().clone()
    with torch.no_grad():
        wpe[0].copy_(wpe[1])
    try:
        yield
    finally:
        with torch.no_grad():
            wpe[0].copy_(saved)


def second2first_rows(lm: LoadedModel, cases: list[dict], editor: ROME | None = None,
                      ppl_size: int = 50) -> pd.DataFrame:
    """ROME on each case and ME-PPL after it, on the model as it is and with Second2First
    (`second_to_first` held during the edit and the measurement). Rows: mode, case_id, ppl_original
    (unedited, same mode), ppl, denominator."""
    editor = editor or ROME()
    rows = []
    for mode in ("original", "second2first"):
        with second_to_first(lm) if mode == "second2first" else nullcontext():
            base = me_ppl(lm, ppl_size, progress=False)["mean"]
            for case in cases:
                with edited(lm, EditRequest.from_case(case), editor) as result:
                    ppl = me_ppl(lm, ppl_size, progress=False)["mean"]
                rows.append(dict(mode=mode, case_id=case["case_id"], subject=case["subject"], ppl_original=base,
                                 ppl=ppl, denominator=result.diagnostics["denominator"]))
    return pd.DataFrame(rows)


def position_shift_effect(lm: LoadedModel, texts: list[str], layer: int, offset: int = 1) -> pd.DataFrame:
    """How much the keys at `layer` change when every position id is shifted by `offset`.

    Rotary attention depends on relative positions only, so a shift changes nothing (up to rounding);
    learned absolute positions (GPT-2) change every key. Columns: position, rel_change (‖Δk‖/‖k‖, mean).
    """
    rows = [lm.token_ids(t) for t in texts]
    pad = lm.tok.pad_token_id if lm.tok.pad_token_id is not None else 0
    ids, mask = pad_ids(rows, pad, device=lm.device)
    pos = torch.arange(ids.shape[1], device=lm.device)[None].expand_as(ids)
    keys = []
    for p in (pos, pos + offset):
        with torch.no_grad(), Trace(lm.model, lm.spec.module("mlp_out", layer), retain_input=True, stop=True) as t:
            lm.model(input_ids=ids, attention_mask=mask, position_ids=p)
        keys.append(t.input.double())
    rel = ((keys[1] - keys[0]).norm(dim=-1) / keys[0].norm(dim=-1)).cpu()
    m = mask.bool().cpu()
    return pd.DataFrame([dict(position=j, rel_change=float(rel[:, j][m[:, j]].mean()))
                         for j in range(ids.shape[1]) if m[:, j].any()])


def wikitext_lines(lm: LoadedModel, n_tokens: int | None, seed: int = 0) -> list[str]:
    """Non-empty WikiText-2 lines in a seeded random order, as many as hold about `n_tokens` tokens (all: None)."""
    from ..data import load_wikitext

    lines = [x for x in load_wikitext() if x.strip()]
    order = np.random.default_rng(seed).permutation(len(lines))
    out, total = [], 0
    for i in order:
        if n_tokens is not None and total >= n_tokens:
            break
        out.append(lines[i])
        total += len(lm.token_ids(lines[i]))
    return out


def moment_variants(lm: LoadedModel, layer: int, n_tokens: int | None, seq_lens=(64, 1024),
                    first_shares=(0.01, 0.1)) -> dict[str, Moment]:
    """C of `layer` gathered in different ways from WikiText-2, each about `n_tokens` keys, with
    meta["first_share"] (share of first-position keys):

    - "windows T=<T>": the stream cut into T-token windows (stats.second_moment, cached);
    - "per line", "per line, skip first": one sequence per line, with and without position 0;
    - "T=<max> + <s> first": the longest windows' C with a share s of first-position keys mixed in.
    """
    from ..models.stats import second_moment

    out = {}
    for T in seq_lens:
        m = second_moment(lm, layer, n_tokens=n_tokens, seq_len=T)
        m.meta["first_share"] = first_share_of(m.count, T)
        out[f"windows T={T}"] = m
    per_line = line_moments(lm, layer, wikitext_lines(lm, n_tokens))
    out["per line"], out["per line, skip first"] = per_line["lines"], per_line["lines_skip_first"]
    base = out[f"windows T={max(seq_lens)}"]
    for s in first_shares:
        mixed = mix_first(base, per_line["first"], s)
        mixed.meta["first_share"] = (1 - s) * base.meta["first_share"] + s
        out[f"T={max(seq_lens)} + {s:.0%} first"] = mixed
    return out


def denominators_under(frame: pd.DataFrame, vectors: dict[str, np.ndarray], moments: dict[str, Moment | None]):
    """ROME's denominator (C⁻¹k̄)ᵀk^u / ‖C⁻¹k̄‖ of every case of `case_keys` under each C (None: C = I).

    Tidy: variant, first_share, the frame's columns, denominator, gain."""
    k_u, k_bar = torch.from_numpy(vectors["k_u"]), torch.from_numpy(vectors["k_bar"])
    parts = []
    for name, m in moments.items():
        u = m.inv_apply(k_bar) if m is not None else k_bar
        g = guard.key_geometry(k_u, k_bar, u)
        parts.append(frame.drop(columns=[c for c in g if c in frame]).assign(
            variant=name, first_share=m.meta.get("first_share", float("nan")) if m is not None else float("nan"),
            denominator=g["denominator"], gain=g["gain"]))
    return pd.concat(parts, ignore_index=True)


def median_table(rows: pd.DataFrame, by=("mom2", "case"), columns=("denominator", "numerator_norm", "delta_norm",
                                                                     "ppl")) -> pd.DataFrame:
    """Medians (and counts) of the update's parts per group, as the paper's table of numerator and denominator."""
    g = rows.groupby(list(by))
    return g[list(columns)].median().assign(edits=g.size())
