"""Notebook 07: do the Fall-of-ROME findings hold across model sizes? One study per model, then one table.

Per model (`model_study`):
- ROME on every CounterFact case whose subject is the prompt's first token (up to `n_first_token`) and on
  `n_random` random cases (`edit_samples`: the same nested samples as notebook 02, whose rows are reused);
- C-ROME bare and behind a test-time prefix on ROME's collapse cases;
- the guard on ROME's measured edits: threshold calibrated on this model's calibration half (`guard.assess`), and
  a reference model's calibrated threshold applied as it is, both judged on the same held-out half;
- HardCF's size, estimated as every first-token collapse (all of them edited) plus the random sample's rate of
  collapse among the other cases times their number in CounterFact (Wilson interval);
- with `n_screen`, the guard's screen (keys only) of every first-token case and `n_screen` random cases,
  confirmed by real edits of the flagged cases and of the highest scores below the threshold (`guard_screen`),
  which estimates HardCF's size from the screen's strata (`screen_estimate`).

`cross_model_table` gives one row per model; `cross_model_lines` the README's table with each number's n, the
papers' GPT-2-XL / GPT-J-6B / Llama-2-7b beside them (`results.papers`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import data, guard
from ..editors import ROME
from ..eval.perplexity import me_ppl
from ..experiments.single import edit_samples, first_token_cases, results_store, sample_rows, sweep_samples
from ..hardcases import hardcf
from ..models.loading import LoadedModel
from ..results import papers
from . import spillover
from .crome_report import hardcf_summary
from ..results.labels import is_collapsed
from ..results.tables import perplexity_text, wilson_interval

EDITORS = ("rome", "c-rome", "c-rome-prefix")


@dataclass
class ModelStudy:
    """One model's rows (`rows`: ROME on every sampled case, C-ROME bare and prefixed on ROME's collapse cases,
    with `sample` and `case`, ROME's label), its unedited ME-PPL, its guard metrics (`guard`: own / transferred,
    each `guard.evaluate` of the held-out half plus the threshold), its CounterFact counts and its guard screen
    (`screen`: `guard_screen`'s result; empty where none ran)."""

    model: str
    bos: bool
    ppl_original: float
    ppl_size: int
    rows: pd.DataFrame
    guard: dict
    n_counterfact: int
    n_first_available: int
    screen: dict = field(default_factory=dict)

    def rome(self) -> pd.DataFrame:
        return self.rows[(self.rows.editor == "rome") & self.rows.error.isna()]


def sample_sizes(model: str, model_sizes: dict, **sizes) -> dict:
    """The notebook's sample sizes (`sizes`: n_random, max_first_token, ...), replaced by `model_sizes[model]`'s
    where it gives them."""
    return dict(sizes, **model_sizes.get(model, {}))


def model_study(lm: LoadedModel, results_dir: str, n_random: int, n_first_token: int | None = None,
                ppl_size: int = 50, seed: int = 0, reference: str = "smollm2-135m", n_screen: int = 0,
                n_confirm: int | None = None, n_margin: int = 4) -> ModelStudy:
    """The edits, labels, guard and (with `n_screen`) guard screen of one model (edits and screened keys already
    in the results store are reused)."""
    cf = data.load_counterfact()
    store = results_store(results_dir, "single_edit")
    original = me_ppl(lm, ppl_size, progress=False)["mean"]
    # every first-token case, in CounterFact's order: a sample of them is edit_samples' (one tokenizer scan, not two)
    first_all = first_token_cases(lm, cf, len(cf), seed)
    n_take = len(first_all) if n_first_token is None else n_first_token
    samples = edit_samples(lm, n_random, 0, 0, 0, seed) | (
        {"first-token": first_token_cases(lm, first_all, n_take, seed)} if n_take and first_all else {})
    n_first = len(first_all)
    sweep_samples(lm, ["rome"], samples, store, ppl_size, ppl_original=original)
    rows = _labelled(sample_rows(store, lm.spec.name, ["rome"], samples, ppl_size), original)
    collapsed_ids = set(rows[rows.case == "collapse"].case_id)
    collapse = {"collapse": [c for c in cf if c["case_id"] in collapsed_ids]}
    if collapse["collapse"]:
        sweep_samples(lm, EDITORS[1:], collapse, store, ppl_size, ppl_original=original)
    rows = _labelled(sample_rows(store, lm.spec.name, EDITORS, samples, ppl_size), original)
    study = ModelStudy(lm.spec.name, bool(lm.spec.prepend_bos), original, ppl_size, rows,
                       guard_transfer(lm, rows, reference), len(cf), n_first)
    if n_screen and study.guard:
        study.screen = guard_screen(lm, study, results_dir, first_all, n_screen, n_confirm, n_margin, seed)
    return study


def guard_screen(lm: LoadedModel, study: ModelStudy, results_dir: str, first_cases: list[dict], n_screen: int,
                 n_confirm: int | None = None, n_margin: int = 4, seed: int = 0) -> dict:
    """The guard's screen (keys only, `hardcf.screen`) of every first-token case (`first_cases`) and `n_screen`
    random CounterFact cases, judged by the model's own calibrated threshold; then real ROME edits (`hardcf.confirmation_plan`) of the
    flagged cases (a seeded sample of `n_confirm` where more are flagged), of the `n_margin` highest scores below the
    threshold, and the study's own uniform samples in every stratum (already edited). Returns the plan, the measured
    labels and `screen_estimate`'s HardCF size."""
    cf = data.load_counterfact()
    by_id = {c["case_id"]: c for c in cf}
    first_ids = {c["case_id"] for c in first_cases}
    cases = {c["case_id"]: c for c in data.load_counterfact(n=n_screen, seed=seed)} | {i: by_id[i] for i in first_ids}
    screens = results_store(results_dir, "guard_screen")
    hardcf.screen(lm, sorted(cases.values(), key=lambda c: c["case_id"]), screens, ROME(), progress=False)
    screened = hardcf.screen_rows(screens, "guard_screen", lm.spec.name)
    screened = screened[screened.case_id.isin(cases)]
    threshold = study.guard["own"]["threshold"]
    rome = study.rome()
    uniform = rome[rome["sample"].isin(["random", "first-token"])].case_id.astype(int).unique().tolist()
    plan = hardcf.confirmation_plan(screened, threshold, n_margin, uniform, max_flagged=n_confirm, seed=seed)
    plan.loc[plan.case_id.isin(uniform), "edit"] = True  # a flagged case of the study's samples is measured already
    todo = {"screen": [by_id[int(i)] for i in plan[plan.edit].case_id]}
    store = results_store(results_dir, "single_edit")
    sweep_samples(lm, ["rome"], todo, store, study.ppl_size, ppl_original=study.ppl_original)
    edits = _labelled(sample_rows(store, lm.spec.name, ["rome"], todo, study.ppl_size), study.ppl_original)
    measured = edits[edits.ppl.notna()].assign(label=lambda d: d.collapsed.astype(bool))[["case_id", "ppl", "label"]]
    plan = plan.assign(first_token_case=plan.case_id.isin(first_ids))
    return dict(plan=plan, measured=measured, threshold=threshold,
                **screen_estimate(plan, measured, first_ids, len(cf)))


def screen_estimate(plan: pd.DataFrame, measured: pd.DataFrame, first_ids: set, n_counterfact: int) -> dict:
    """HardCF's size from a screen of every first-token case and a random sample of the others. In each part, the
    collapses are the flagged ones plus the misses (`hardcf.recall_estimate`: each stratum's measured rate times
    its size; the rest's from its uniform sample, with a 95 % Clopper-Pearson upper bound). The first-token part is
    all of CounterFact's; the other part is scaled by CounterFact's other cases over those screened."""
    first = plan.case_id.isin(first_ids).to_numpy()
    parts = {name: hardcf.recall_estimate(plan[mask], measured) if mask.any() else None
             for name, mask in (("first", first), ("other", ~first))}
    scale = (n_counterfact - len(first_ids)) / max(int((~first).sum()), 1)

    def total(key):
        return sum((p["caught"] + p[key]) * (scale if name == "other" else 1.0)
                   for name, p in parts.items() if p is not None)

    flagged = plan[plan.stratum == "flagged"]
    confirmed = measured[measured.case_id.isin(flagged.case_id)]
    return dict(screened=len(plan), flagged=len(flagged), flagged_edited=len(confirmed),
                flagged_collapse=int(confirmed.label.sum()), parts=parts,
                hardcf_estimate=total("missed_estimate"), hardcf_upper95=total("missed_upper95"))


def _labelled(rows: pd.DataFrame, original: float) -> pd.DataFrame:
    """Rows with `collapsed` (`labels.is_collapsed`, 2× the unedited) and `case`: ROME's label of the case."""
    if rows.empty:
        return rows.assign(collapsed=pd.Series(dtype=bool), case=pd.Series(dtype=object))
    ok = rows.ppl.notna()
    rows = rows.assign(collapsed=False)
    rows.loc[ok, "collapsed"] = is_collapsed(rows.ppl[ok].astype(float), ppl_original=original)
    rome = rows[(rows.editor == "rome") & ok]
    label = dict(zip(rome.case_id, np.where(rome.collapsed, "collapse", "normal")))
    return rows.assign(case=rows.case_id.map(label))


def guard_transfer(lm: LoadedModel, rows: pd.DataFrame, reference: str = "smollm2-135m") -> dict:
    """The guard on the model's measured ROME edits: "own" (threshold calibrated on this model's calibration half)
    and "transferred" (`reference`'s calibrated threshold, `guard.THRESHOLDS`), both on the held-out half; AUROC
    does not depend on the threshold, precision and recall do. Empty when there are no ROME edits."""
    rome = rows[(rows.editor == "rome") & rows.error.isna()].drop_duplicates("case_id")
    if rome.empty:
        return {}
    lab, res = guard.assess(lm, rome, ROME())
    test = lab[~lab.calibration]
    transferred = guard.THRESHOLDS[(reference, False)]
    return dict(own=dict(res["held_out"], threshold=res["threshold"], calibrated=res["calibrated"]),
                transferred=dict(guard.evaluate(test.score, test.label, transferred), threshold=transferred,
                                 reference=reference),
                features=res["features"])


def hardcf_estimate(study: ModelStudy) -> dict:
    """HardCF's size: the first-token collapses (exact where every first-token case was edited) plus the random
    sample's collapse rate among its other cases times their number in CounterFact, with the rate's Wilson
    interval carried through."""
    rome = study.rome()
    first = rome[rome["sample"] == "first-token"].drop_duplicates("case_id")
    other = rome[(rome["sample"] == "random") & ~rome.first_token.astype(bool)].drop_duplicates("case_id")
    k, n = int(other.collapsed.sum()), len(other)
    lo, hi = wilson_interval(k, n)
    rest = study.n_counterfact - study.n_first_available
    exact = int(first.collapsed.sum())
    return dict(first_edited=len(first), first_available=study.n_first_available, first_collapse=exact,
                other_n=n, other_collapse=k, estimate=exact + (k / n if n else np.nan) * rest,
                low=exact + lo * rest, high=exact + hi * rest, complete=len(first) == study.n_first_available)


def cross_model_table(studies: list[ModelStudy]) -> pd.DataFrame:
    """One row per model: first-token collapse rate with its Wilson interval and n, median normalised
    denominators of collapse and normal ROME edits with n, C-ROME's largest ME-PPL on ROME's collapse cases
    (bare; and its prefixed efficacy), the guard's held-out AUROC / recall / precision with its own threshold
    and with the reference's, the HardCF estimate, and the size of the model's shipped HardCF where one ships
    (`data/hardcf/<model>.summary.json`: a screen of all of CounterFact, confirmed by edits)."""
    out = []
    for s in studies:
        rome, estimate = s.rome(), hardcf_estimate(s)
        k, n = estimate["first_collapse"], estimate["first_edited"]
        lo, hi = wilson_interval(k, n)
        den = rome.drop_duplicates("case_id").groupby("case").denominator
        crome = s.rows[(s.rows.editor == "c-rome") & (s.rows.case == "collapse") & s.rows.error.isna()]
        prefix = s.rows[(s.rows.editor == "c-rome-prefix") & (s.rows.case == "collapse") & s.rows.error.isna()]
        g = s.guard or {}
        row = dict(model=s.model, bos=s.bos, ppl_original=s.ppl_original, first_n=n, first_collapse=k,
                   first_rate=k / n if n else np.nan, first_rate_lo=lo, first_rate_hi=hi,
                   den_collapse=den.median().get("collapse", np.nan), den_collapse_n=int(den.size().get("collapse", 0)),
                   den_normal=den.median().get("normal", np.nan), den_normal_n=int(den.size().get("normal", 0)),
                   crome_n=len(crome), crome_max_ppl=crome.ppl.max() if len(crome) else np.nan,
                   crome_efficacy=crome.efficacy.mean() if len(crome) else np.nan,
                   crome_prefixed_efficacy=(prefix.prefixed_efficacy.mean() if len(prefix) and "prefixed_efficacy"
                                            in prefix else np.nan))
        for which in ("own", "transferred"):
            m = g.get(which, {})
            row.update({f"guard_{which}_{k2}": m.get(k2, np.nan) for k2 in ("n", "collapse", "auroc", "recall",
                                                                            "precision", "threshold")})
        row.update({f"hardcf_{k2}": v for k2, v in estimate.items()})
        row.update({f"screen_{k2}": s.screen.get(k2, np.nan) for k2 in SCREEN_COLUMNS})
        shipped = hardcf_summary(s.model)  # a screen of all of CounterFact, confirmed by edits (notebook 04)
        row.update(hardcf_shipped=shipped.get("hardcf_size", np.nan) if shipped else np.nan,
                   hardcf_screened=shipped.get("screened", np.nan) if shipped else np.nan)
        out.append(row)
    return pd.DataFrame(out).set_index("model")


def study_spillover(lm: LoadedModel, study: ModelStudy, texts: list[str], n_cases: int, seed: int = 0) -> pd.DataFrame:
    """`spillover.spillover` of up to `n_cases` of the study's ROME collapse cases and as many normal ones, the latter
    from the random sample and not first-token cases (a seeded pick of each), with each case's ME-PPL, denominator
    and ROME label (`case`)."""
    rome = study.rome().drop_duplicates("case_id")
    normal = rome[(rome.case == "normal") & (rome["sample"] == "random") & ~rome.first_token.astype(bool)]
    groups = [g for g in (rome[rome.case == "collapse"], normal) if len(g)]
    if not groups or not n_cases:
        return pd.DataFrame()
    pick = pd.concat([g.sample(min(n_cases, len(g)), random_state=seed) for g in groups])
    by_id = {c["case_id"]: c for c in data.load_counterfact()}
    rows = spillover.spillover(lm, [by_id[int(i)] for i in pick.case_id], texts)
    return rows.merge(pick[["case_id", "ppl", "denominator", "case"]], on="case_id")


def spillover_table(spill: pd.DataFrame) -> pd.DataFrame:
    """Per model and ROME label: the median over cases of each stage's median relative change, the number of cases,
    and the unedited model's mlp_share."""
    t = spill.pivot_table(index=["model", "case"], columns="stage", values="median", aggfunc="median")
    t = t[[c for c in spillover.STAGES if c in t]]
    n = spill.groupby(["model", "case"]).case_id.nunique().rename("cases")
    return t.join(n).join(spill.groupby(["model", "case"]).mlp_share.first())


SCREEN_COLUMNS = ("screened", "flagged", "flagged_edited", "flagged_collapse", "hardcf_estimate", "hardcf_upper95")


def screen_line(study: ModelStudy) -> str:
    """One line on a model's guard screen: cases screened, flagged, confirmed, and the HardCF estimate."""
    sc = study.screen
    if not sc:
        return f"{study.model}: no guard screen"
    return (f"{study.model}: the guard screened {sc['screened']:,} cases (every first-token case and a random sample), "
            f"flagged {sc['flagged']} (uᵀk^u below {np.exp(-sc['threshold']):.3g}); {sc['flagged_collapse']} of "
            f"{sc['flagged_edited']} flagged edits collapse; " + (
                f"HardCF estimated at {sc['hardcf_estimate']:,.0f} (at most {sc['hardcf_upper95']:,.0f}) of "
                f"{study.n_counterfact:,} CounterFact cases" if np.isfinite(sc["hardcf_estimate"]) else
                "HardCF not estimated: a stratum below the threshold has no edited case"))


PAPER_MODELS = {"gpt2-xl": "GPT-2-XL (paper)", "gpt-j-6b": "GPT-J-6B (paper)", "llama2-7b": "Llama-2-7b (paper)"}


def cross_model_lines(table: pd.DataFrame, labels: dict[str, str] | None = None) -> list[str]:
    """The README's cross-model table: our models (`labels`: {model: label}) with n on every number, then the
    papers' models with what the papers report (median denominators, C-ROME's largest ME-PPL, HardCF size)."""
    labels = labels or {m: m for m in table.index}
    head = ["| model | BOS | first-token cases that collapse | median denominator, collapse / normal | "
            "C-ROME's largest ME-PPL (unedited) | guard AUROC, held out | recall / precision: own threshold, "
            "transferred | HardCF size |",
            "|---|---|---|---|---|---|---|---|"]
    out = []
    for model, label in labels.items():
        if model not in table.index:
            continue
        r = table.loc[model]
        hard = (f"{r.hardcf_estimate:,.0f} ({r.hardcf_low:,.0f}–{r.hardcf_high:,.0f}; estimated from "
                f"{int(r.hardcf_other_n)} random cases")
        hard += ")" if r.hardcf_complete else (f", {int(r.hardcf_first_edited)} of {int(r.hardcf_first_available)} "
                                               "first-token cases edited)")
        if not pd.isna(r.screen_hardcf_estimate):
            hard = (f"{r.screen_hardcf_estimate:,.0f} (at most {r.screen_hardcf_upper95:,.0f}; the guard's screen of "
                    f"{int(r.screen_screened):,} cases: {int(r.screen_flagged)} flagged, {int(r.screen_flagged_collapse)} "
                    f"of {int(r.screen_flagged_edited)} edited collapse)")
        if not pd.isna(r.hardcf_shipped):
            hard = (f"{int(r.hardcf_shipped)} (the guard's screen of all {int(r.hardcf_screened):,}, confirmed by "
                    f"edits); this sample: {hard}")
        out.append(
            f"| {label} | {'yes' if r.bos else 'no'} | {int(r.first_collapse)} of {int(r.first_n)} "
            f"({r.first_rate:.0%}, {r.first_rate_lo:.0%}–{r.first_rate_hi:.0%}) | {r.den_collapse:.2f} (n {r.den_collapse_n}) / "
            f"{r.den_normal:.2f} (n {r.den_normal_n}) | {perplexity_text(r.crome_max_ppl, 2, 1e4)} "
            f"(n {r.crome_n}; {perplexity_text(r.ppl_original, 2, 1e4)}) | {r.guard_own_auroc:.2f} "
            f"(n {_int(r.guard_own_n)}, {_int(r.guard_own_collapse)} collapse) | {r.guard_own_recall:.2f} / "
            f"{r.guard_own_precision:.2f}, {r.guard_transferred_recall:.2f} / {r.guard_transferred_precision:.2f} | "
            f"{hard} |".replace("nan", "–"))
    for model, label in PAPER_MODELS.items():
        ref = papers.reference(model).set_index(papers.KEY).value
        get = lambda q, e, c: ref.get((q, e, c), np.nan)  # noqa: E731
        out.append(f"| {label} | {'yes' if model == 'llama2-7b' else 'no'} | | "
                   f"{get('median_denominator', 'rome', 'collapse'):.2f} / {get('median_denominator', 'rome', 'normal'):.2f} | "
                   f"{get('max_ppl', 'c-rome', 'collapse'):.2f} ({get('max_ppl', 'unedited', ''):.2f}) | | | "
                   f"{get('hardcf_size', 'rome', 'collapse'):.0f} |")
    return head + out


def _int(x) -> str:
    return "–" if pd.isna(x) else f"{int(x)}"


def figures(studies: list[ModelStudy], norms: pd.DataFrame, spill: pd.DataFrame | None = None):
    """07_scale.png: ROME's normalised denominator per model, collapse against normal (log scale), the key norm per
    position over its model's median at positions ≥ 2 (`crome.relative_norms`) and, with `spill`, each edit's
    median relative change of the edited layer's output on unrelated tokens (`study_spillover`)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from ..paths import figures_dir

    rome = pd.concat([s.rome().drop_duplicates("case_id").assign(model=s.model) for s in studies], ignore_index=True)
    panels = 3 if spill is not None and len(spill) else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5))
    if len(rome):
        sns.stripplot(data=rome, x="model", y="denominator", hue="case", hue_order=["collapse", "normal"], dodge=True,
                      ax=axes[0], alpha=0.7, size=4)
    axes[0].set(yscale="log", xlabel="", ylabel="(u/‖u‖)ᵀk^u", title="ROME's denominator, by ROME's outcome")
    if len(norms):
        sns.lineplot(data=norms[norms.position < 16], x="position", y="key_rel", hue="model", marker="o", ax=axes[1],
                     errorbar=None)
    axes[1].set(yscale="log", ylabel="‖key‖ / median at positions ≥ 2", xlabel="position (−1: BOS)",
                title="Key norms at ROME's layer, per position")
    if panels == 3:
        out = spill[spill.stage == "layer_out"]
        sns.stripplot(data=out, x="model", y="median", hue="case", hue_order=["collapse", "normal"], dodge=True,
                      ax=axes[2], size=5)
        axes[2].set(yscale="log", xlabel="", ylabel="median ‖Δ layer output‖ / ‖layer output‖",
                    title="How far one ROME edit reaches: unrelated tokens")
    fig.tight_layout()
    fig.savefig(figures_dir() / "07_scale.png", dpi=150)
    return fig
