"""Notebook 04's study on the results store ("The Fall of ROME", Sec. 3-5): the edits of a sample (ROME and
C-ROME with C = I, ROME with C, C-ROME with a test-time prefix on ROME's collapse cases), their labels by
`labels.is_collapsed`, the keys k^u, k̄, C⁻¹k̄ of the edited cases, ROME under each way of gathering C, the guard
held out, and the report against the paper.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import data, guard
from ..editors import ROME
from ..editors.rome import PRESETS
from ..eval.perplexity import me_ppl
from ..experiments.single import first_token_cases, results_store
from ..hardcases.hardcf import edit_rows, sweep_missing
from ..models.loading import LoadedModel
from ..models.stats import Moment, second_moment
from ..results.labels import is_collapsed
from ..results.query import select
from ..results.store import run_cases
from ..results.tables import label_cases
from . import keyspace


@dataclass
class Study:
    """What every step shares: the model, its unedited ME-PPL_{ppl_size}, ROME's layer, the C of the
    mom2_adjustment runs (`mom2_tokens` WikiText-2 keys) and the results store (`results_dir`)."""

    lm: LoadedModel
    results_dir: str = "results"
    ppl_size: int = 50
    mom2_tokens: int | None = 100000
    rome: ROME = field(default_factory=ROME)

    def __post_init__(self):
        self.model = self.lm.spec.name
        self.original = me_ppl(self.lm, self.ppl_size, progress=False)["mean"]
        self.layer = self.rome.hparams_for(self.lm).layer
        self.mom2_hparams = dict(mom2_adjustment=True, mom2_n_tokens=self.mom2_tokens)
        self.C = second_moment(self.lm, self.layer, n_tokens=self.mom2_tokens)  # cached
        self.cf = {c["case_id"]: c for c in data.load_counterfact()}
        self.experiment = f"single_edit_ppl{self.ppl_size}"
        self.store = results_store(self.results_dir, "single_edit")  # shared with notebooks 01-03

    def describe(self) -> str:
        return (f"{self.model}: unedited ME-PPL_{self.ppl_size} {self.original:.2f}; ROME edits layer {self.layer}; "
                f"BOS: {self.lm.spec.prepend_bos}; C from {self.C.count} keys")

    def experiment_of(self, mom2: bool) -> str:
        return f"{self.experiment}_mom2" if mom2 else self.experiment

    def label(self, rows: pd.DataFrame) -> pd.DataFrame:
        """`label_cases` with `collapsed` from `labels.is_collapsed` (above the threshold and 2× the unedited)."""
        return label_cases(rows.assign(collapsed=is_collapsed(rows.ppl.astype(float), ppl_original=self.original)))

    def sweep(self, editor: str, cases: list[dict], mom2: bool = False, lm: LoadedModel | None = None,
              ppl_original: float | None = None, editor_kwargs: dict | None = None) -> None:
        """The single edits of `cases` that no store of hardcf.EDIT_STORES holds yet, into the shared store
        (`lm`: another model, with its own unedited perplexity `ppl_original`)."""
        kwargs = editor_kwargs or (dict(hparams=self.mom2_hparams) if mom2 else None)
        sweep_missing(lm or self.lm, editor, cases, self.store, results_dir=self.results_dir,
                            experiment=self.experiment_of(mom2), ppl_size=self.ppl_size,
                            ppl_original=ppl_original or self.original, editor_kwargs=kwargs)

    def rows(self, editors, cases: list[dict], mom2: bool = False, model: str | None = None) -> pd.DataFrame:
        """The rows of `editors` on `cases` in every edit store."""
        return select(edit_rows(self.results_dir), experiment=self.experiment_of(mom2),
                      model=model or self.model, editor=list(editors), cases={"counterfact": cases})


@dataclass
class Edits:
    """The sample's rows (`sample`: ROME, C-ROME and C-ROME with prefix, C = I, labelled), ROME's collapse and
    normal cases among them, and `stored`: every successful ROME edit of the model in the stores, with `mom2`
    and `case` (the distributions' data)."""

    cases: list[dict]
    sample: pd.DataFrame
    sample_mom2: pd.DataFrame
    stored: pd.DataFrame
    collapse_ids: list[int]
    normal_ids: list[int]
    n_first: int

    def describe(self, study: Study) -> str:
        n = {m: int((self.stored.mom2 == m).sum()) for m in (False, True)}
        mom2 = int((self.sample_mom2.case == "collapse").sum())
        return (f"sample: {len(self.cases)} cases, {self.n_first} with a first-token subject; ROME collapses "
                f"{len(self.collapse_ids)} ({self.collapse_ids}), with mom2_adjustment {mom2}\n"
                f"the stores hold {n[False]} ROME edits of {study.model} with C = I and {n[True]} with C")


def sample_edits(study: Study, cases: list[dict]) -> Edits:
    """ROME and C-ROME (C = I) and ROME with C on every case, C-ROME with a test-time prefix on ROME's collapse
    cases; edits in any store are reused."""
    for name in ("rome", "c-rome"):
        study.sweep(name, cases)
    study.sweep("rome", cases, mom2=True)
    rows = study.label(study.rows(["rome", "c-rome"], cases))
    rome = rows[rows.editor == "rome"]
    collapse_ids = sorted(rome[rome.case == "collapse"].case_id.astype(int))
    normal_ids = sorted(rome[rome.case == "normal"].case_id.astype(int))
    n_first = sum({int(i): bool(f) for i, f in zip(rows.case_id, rows.first_token)}.values())
    study.sweep("c-rome-prefix", [study.cf[i] for i in collapse_ids])
    edits = edit_rows(study.results_dir)
    parts = [select(edits, ok=True, experiment=study.experiment_of(m), model=study.model, editor="rome",
                    dataset="counterfact").assign(mom2=m) for m in (False, True)]
    stored = pd.concat([p for p in parts if len(p)], ignore_index=True)
    stored["case"] = np.where(is_collapsed(stored.ppl.astype(float), ppl_original=study.original), "collapse",
                              "normal")
    sample_mom2 = study.label(study.rows(["rome"], cases, mom2=True))
    return Edits(cases, study.label(study.rows(["rome", "c-rome", "c-rome-prefix"], cases)), sample_mom2,
                 stored, collapse_ids, normal_ids, n_first)


# ---------------------------------------------------------------- keys of the edited cases
@dataclass
class CaseKeys:
    """k^u, k̄, C⁻¹k̄ of every ROME-edited case (`frame`, `vectors`) and k^u of the collapse prompts behind a
    context prefix (`prefixed`, `prefixed_vectors`; the paper's Fig. b)."""

    frame: pd.DataFrame
    vectors: dict
    prefixed: pd.DataFrame | None
    prefixed_vectors: dict | None

    def points(self, method: str, seed: int = 0) -> pd.DataFrame:
        """`keyspace.project` of all vectors; behind a prefix only k^u, as kind "k_u behind a prefix"."""
        labels = self.frame[["case_id", "case", "first_token"]].assign(prompt="bare")
        vecs = self.vectors
        if self.prefixed is not None:
            labels = pd.concat([labels, self.prefixed[["case_id", "first_token"]].assign(case="collapse",
                                                                                        prompt="prefixed")],
                               ignore_index=True)
            vecs = {k: np.concatenate([self.vectors[k], self.prefixed_vectors[k]]) for k in keyspace.KINDS}
        pts = keyspace.project(vecs, labels, method=method, seed=seed)
        pts = pts[(pts.prompt == "bare") | (pts.kind == "k_u")].copy()
        pts.loc[pts.prompt == "prefixed", "kind"] = "k_u behind a prefix"
        return pts

    def describe(self) -> str:
        f = self.frame
        cos = f.groupby("case").cosine.median()
        out = (f"{len(f)} cases ({(f.case == 'collapse').sum()} collapse); median cos(k^u, k̄): "
               + ", ".join(f"{c} {v:.3f}" for c, v in cos.items()))
        if self.prefixed is not None:
            p = self.prefixed
            out += (f"\ncollapse cases behind a prefix: median cos(k^u, k̄) {np.median(p.cosine):.3f}, median "
                    f"denominator {np.median(p.denominator):.3g} (bare: "
                    f"{f[f.case == 'collapse'].denominator.median():.3g})")
        return out


def case_keys(study: Study, edits: Edits) -> CaseKeys:
    """The keys of every case ROME edited (stored or sampled), labelled by the stored edits, under the study's C."""
    stored = edits.stored[~edits.stored.mom2]
    label_of = dict(zip(stored.case_id.astype(int), stored.case))
    ids = sorted(set(label_of) | set(edits.collapse_ids) | set(edits.normal_ids))
    frame, vecs = keyspace.case_keys(study.lm, [study.cf[i] for i in ids], study.rome, moment=study.C)
    frame["case"] = [label_of.get(int(i), "normal") for i in frame.case_id]
    contexts = guard.key_site(study.lm, study.rome).contexts
    prefixed = [dict(study.cf[i], prompt=contexts[1 + j % (len(contexts) - 1)].replace("{}", study.cf[i]["prompt"]))
                for j, i in enumerate(frame[frame.case == "collapse"].case_id)]
    if not prefixed:
        return CaseKeys(frame, vecs, None, None)
    return CaseKeys(frame, vecs, *keyspace.case_keys(study.lm, prefixed, study.rome, moment=study.C))


def relative_norms(profiles: dict[str, LoadedModel], texts: list[str], layer: int) -> pd.DataFrame:
    """`keyspace.position_profile` of each model at its ROME layer (`layer` for models without a preset), with
    hidden_rel and key_rel: each norm over its model's median at positions ≥ 2."""
    parts = []
    for name, m in profiles.items():
        L = ROME().hparams_for(m).layer if m.spec.name in PRESETS else layer
        p = keyspace.position_profile(m, texts, [L], max_len=24).assign(model=name)
        later = p[p.position >= 2]
        parts.append(p.assign(hidden_rel=p.hidden_norm / later.hidden_norm.median(),
                              key_rel=p.key_norm / later.key_norm.median()))
    return pd.concat(parts, ignore_index=True)


def anomaly_table(prof: pd.DataFrame) -> pd.DataFrame:
    """Median relative norms at positions −1 (BOS), 0 and 1, per model."""
    t = prof.groupby(["model", "position"])[["hidden_rel", "key_rel"]].median().unstack("position")
    return pd.DataFrame({(w, pos): t[(w, pos)] for w in ("hidden_rel", "key_rel") for pos in (-1, 0, 1)
                         if (w, pos) in t})


def bos_table(study: Study, edits: Edits, lm_bos: LoadedModel, n: int) -> tuple[pd.DataFrame, float]:
    """ROME on the first `n` collapse cases again with a BOS-like token before every text (`keyspace.with_bos`):
    (subject, prompt, ppl and denominator without and with it; the unedited ME-PPL with it)."""
    cases = [study.cf[i] for i in edits.collapse_ids[:n]]
    original = me_ppl(lm_bos, study.ppl_size, progress=False)["mean"]
    study.sweep("rome", cases, lm=lm_bos, ppl_original=original,
                editor_kwargs=dict(hparams=dict(PRESETS[study.model])))
    with_bos = study.rows(["rome"], cases, model=lm_bos.spec.name)
    s = edits.sample
    return (s[(s.editor == "rome") & s.case_id.isin(edits.collapse_ids[:n])]
            [["case_id", "subject", "prompt", "ppl", "denominator"]]
            .merge(with_bos[["case_id", "ppl", "denominator"]], on="case_id", suffixes=("", " with BOS"))), original


def first_token_share(study: Study, edits: Edits) -> tuple[float, pd.DataFrame]:
    """(share of first-token subjects in all of CounterFact: from the guard's screen of it where that covers
    CounterFact, else counted; the guard's screen rows of the model)."""
    rows = results_store(study.results_dir, "guard_screen").read()
    screened = rows[(rows.model == study.model) & rows.experiment.astype(str).str.startswith("guard_screen")
                    & ~rows.experiment.astype(str).str.contains("mom2")] if len(rows) else rows
    if len(screened) >= len(study.cf) * 0.99:
        return screened.drop_duplicates("case_id").first_token.fillna(False).mean(), screened
    return len(first_token_cases(study.lm, list(study.cf.values()), len(study.cf))) / len(study.cf), screened


# ---------------------------------------------------------------- how C is gathered, C-ROME, Second2First
IDENTITY = "C = I (papers' code)"


def moments(study: Study, c_tokens: int | None, seq_lens, first_shares) -> dict[str, Moment | None]:
    """C = I and the C of `keyspace.moment_variants`, each from about `c_tokens` keys."""
    return {IDENTITY: None, **keyspace.moment_variants(study.lm, study.layer, c_tokens, seq_lens, first_shares)}


def c_gathering(study: Study, edits: Edits, moments: dict[str, Moment | None], n_cases: int,
                c_tokens: int | None) -> pd.DataFrame:
    """`keyspace.rome_under_moments` on `n_cases` collapse and as many normal cases (store `c_gathering`,
    resumable): one row per (case, C) with `case`."""
    cases = [study.cf[i] for i in edits.collapse_ids[:n_cases] + edits.normal_ids[:n_cases]]
    store = results_store(study.results_dir, "c_gathering")
    experiment = f"c_gathering_ppl{study.ppl_size}_n{c_tokens or 'all'}"
    run_cases(store, cases, lambda c: dict(rows=keyspace.rome_under_moments(study.lm, c, moments, study.ppl_size,
                                                                            study.rome)),
              key_of=lambda c: (experiment, study.model, "rome", c["dataset"], c["case_id"]), desc="ROME under every C")
    stored = select(store, experiment=experiment, model=study.model, case_id=[c["case_id"] for c in cases])
    rows = pd.DataFrame([r for rs in stored.get("rows", []) for r in rs])
    if len(rows):
        rows["case"] = ["collapse" if i in edits.collapse_ids else "normal" for i in rows.case_id]
    return rows


def c_gathering_summary(rows: pd.DataFrame) -> list[str]:
    """Per label, the range of ME-PPL across the ways of gathering C and the best and worst of them."""
    out = []
    for case, g in rows.groupby("case"):
        lo, hi = g.ppl.min(), g.ppl.max()
        out.append(f"{case} cases: ME-PPL from {lo:,.0f} to {hi:,.0f} across the {g.variant.nunique()} ways of "
                   f"gathering C ({hi / lo:.1f}x); best: {g.loc[g.ppl.idxmin(), 'variant']}, worst: "
                   f"{g.loc[g.ppl.idxmax(), 'variant']}")
    return out


def crome_table(edits: Edits) -> pd.DataFrame:
    """Per (editor, ROME's label of the case): edits, max and median ME-PPL, the headline metrics and, for
    C-ROME with a test-time prefix, the prefixed ones."""
    rows = edits.sample[edits.sample.error.isna()]
    agg = dict(edits=("case_id", "size"), max_ppl=("ppl", "max"), median_ppl=("ppl", "median"),
               efficacy=("efficacy", "mean"), generalization=("generalization", "mean"), locality=("locality", "mean"))
    if "prefixed_efficacy" in rows:
        agg.update(prefixed_efficacy=("prefixed_efficacy", "mean"),
                   prefixed_generalization=("prefixed_generalization", "mean"))
    return rows.groupby(["editor", "reference_case"]).agg(**agg)


def second2first(gpt: LoadedModel, n: int, ppl_size: int = 50, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """`keyspace.second2first_rows` on `n` first-token cases of `gpt` (any cases where its tokenizer splits
    every subject), with ROME; (rows, "first-token" or "random")."""
    cases = first_token_cases(gpt, data.load_counterfact(n=2000, seed=seed), n, seed)
    kind = "first-token"
    if not cases:
        cases, kind = data.load_counterfact(n=n, seed=seed), "random"
    return keyspace.second2first_rows(gpt, cases, ROME(), ppl_size=ppl_size), kind


def guard_table(study: Study, others=(), load=None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """`guard.assess` on the stored ROME edits of the study's model (C = I and with C) and of the `others` models
    that have edits in the stores (C = I; loaded with `load(name)`): (one row per run with the held-out metrics;
    held-out AUROC of each feature, one column per run)."""
    edits = edit_rows(study.results_dir)
    runs = [(study.model, study.lm, False), (study.model, study.lm, True)]
    runs += [(o, load(o), False) for o in others
             if o != study.model and len(guard.sweep_of(edits, o, study.experiment))]
    assessed, features = [], []
    for name, m, mom2 in runs:
        rows = guard.sweep_of(edits, name, study.experiment_of(mom2))
        if not len(rows):
            continue
        lab, res = guard.assess(m, rows, ROME(hparams=study.mom2_hparams) if mom2 else ROME(), cases=study.cf)
        assessed.append(dict(model=name, mom2_adjustment=mom2, edits=len(lab), collapse=int(lab.label.sum()),
                             threshold_u_k=res["threshold_u_k"], calibrated=res["calibrated"],
                             **{f"held_out_{k}": v for k, v in res["held_out"].items()}))
        features.append(res["features"].assign(model=name, mom2_adjustment=mom2))
    auroc = (pd.concat(features, ignore_index=True).pivot_table(index="feature", columns=["model", "mom2_adjustment"],
                                                               values="auroc_held_out") if features else None)
    return pd.DataFrame(assessed), auroc


def guard_cost(study: Study, edits: Edits, n: int = 3) -> tuple[float, float]:
    """(seconds of one guard check, `guard.risk`, over `n` sampled cases; median seconds of one ROME edit with its
    ME-PPL in the sample)."""
    probe = [study.cf[i] for i in (edits.collapse_ids + edits.normal_ids)[:n]]
    t0 = time.perf_counter()
    for c in probe:
        guard.risk(study.lm, c)
    check = (time.perf_counter() - t0) / len(probe)
    s = edits.sample
    return check, s[(s.editor == "rome")].seconds_total.median()
