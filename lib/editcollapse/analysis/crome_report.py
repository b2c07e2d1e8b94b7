"""Notebook 04 against "The Fall of ROME" (GPT-2-XL unless said): the sentences that quote this run's numbers
beside the paper's (`results.papers`), and the closing Markdown report."""
from __future__ import annotations

import json

import pandas as pd

from ..paths import in_repo
from ..results import papers
from ..results.labels import COLLAPSE_THRESHOLD
from .crome import Edits, Study


def _at(table, index, column, fmt="{:.3g}") -> str:
    """table.loc[index, column] formatted, or "n/a" where this run has no such value."""
    try:
        value = table.loc[index, column]
    except (KeyError, TypeError):
        return "n/a"
    return "n/a" if pd.isna(value) else fmt.format(value)


def _pct(x: float, sep: str = "") -> str:
    return f"{100 * x:.3g}{sep}%"


def denominator_summary(medians: pd.DataFrame) -> list[str]:
    """Median denominator of collapse against normal cases, per C setting, beside the paper's three models
    (Sec. 3)."""
    ref = {c: " / ".join(f"{papers.number('median_denominator', 'rome', c, m):.2f}" for m in papers.MODELS)
           for c in ("collapse", "normal")}
    out = []
    for mom2, g in medians.groupby(level="mom2"):
        d = g.droplevel("mom2").denominator
        if {"collapse", "normal"} <= set(d.index):
            out.append(f"mom2_adjustment={mom2}: median denominator {d['collapse']:.3g} (collapse) vs "
                       f"{d['normal']:.3g} (normal), ratio {d['normal'] / d['collapse']:.0f}x; paper (GPT-2-XL / GPT-J "
                       f"/ Llama2-7b): {ref['collapse']} vs {ref['normal']}")
    return out


def first_token_summary(edits: Edits, share_all: float, n_counterfact: int) -> str:
    coll = edits.stored[(edits.stored.case == "collapse") & ~edits.stored.mom2]
    return (f"first-token subjects: {coll.first_token.mean():.0%} of the {len(coll)} collapse cases (C = I) against "
            f"{share_all:.2%} of all CounterFact ({round(share_all * n_counterfact)} of {n_counterfact} cases)")


def crome_summary(table: pd.DataFrame) -> list[str]:
    """ROME and C-ROME on ROME's collapse cases: maximum ME-PPL and efficacy, bare and behind a prefix (Sec. 5)."""
    out = []
    for editor in ("rome", "c-rome"):
        if (editor, "collapse") in table.index:
            out.append(f"{editor} on ROME's collapse cases: max ME-PPL {table.loc[(editor, 'collapse'), 'max_ppl']:,.1f} "
                       f"(paper, GPT-2-XL: {papers.number('max_ppl', editor, 'collapse'):,.2f}), efficacy "
                       f"{table.loc[(editor, 'collapse'), 'efficacy']:.2f}")
    if ("c-rome-prefix", "collapse") in table.index and "prefixed_efficacy" in table:
        r = table.loc[("c-rome-prefix", "collapse")]
        out.append(f"C-ROME on the collapse cases: efficacy {r.efficacy:.2f} tested bare, {r.prefixed_efficacy:.2f} "
                   f"tested behind a prefix (paper, GPT-2-XL: {_pct(papers.number('efficacy', 'c-rome', 'collapse'))} bare, "
                   f"{_pct(papers.number('prefixed_efficacy', 'c-rome-prefix', 'collapse'))} with the prefix)")
    return out


def _s2f(rows: pd.DataFrame, mode: str, column: str = "ppl") -> pd.Series:
    return rows[rows["mode"] == mode][column]


def second2first_summary(rows: pd.DataFrame, model: str, kind: str) -> str:
    """Unedited and edited ME-PPL without and with Second2First (Sec. 4)."""
    return (f"{model}: unedited ME-PPL {_s2f(rows, 'original', 'ppl_original').iloc[0]:.1f}, with Second2First "
            f"{_s2f(rows, 'second2first', 'ppl_original').iloc[0]:.1f}; mean ME-PPL after ROME on "
            f"{rows.case_id.nunique()} {kind} cases: {_s2f(rows, 'original').mean():,.1f} -> "
            f"{_s2f(rows, 'second2first').mean():,.1f} (paper, GPT-2-XL: {_s2f_paper()})")


def _s2f_paper() -> str:
    return f"{papers.number('mean_ppl', 'rome', 'original'):,.2f} -> {papers.number('mean_ppl', 'rome', 'second2first'):,.2f}"


def hardcf_summary(model: str) -> dict | None:
    """The summary of the shipped HardCF of `model` (data/hardcf/<model>.summary.json), None where there is none."""
    path = in_repo(f"data/hardcf/{model}.summary.json")
    return json.loads(path.read_text()) if path.exists() else None


def report(study: Study, edits: Edits, medians: pd.DataFrame, share_all: float, crome: pd.DataFrame,
           s2f: pd.DataFrame, s2f_model: str, c_rows: pd.DataFrame, guard: pd.DataFrame, cost: tuple[float, float],
           hardcf: dict | None) -> str:
    """This run against the paper, in Markdown: every number computed in the run, the paper's beside them."""
    stored = edits.stored[~edits.stored.mom2]
    coll = stored[stored.case == "collapse"]
    check, edit_cost = cost
    lines = [f"**{study.model}, {len(edits.cases)} sampled CounterFact cases; {len(stored)} ROME edits of this model "
             f"in the stores.**", "",
             f"- Unedited ME-PPL$_{{{study.ppl_size}}}$ {study.original:.1f}. ROME collapsed {len(edits.collapse_ids)} "
             f"of the sample and {len(coll)} of all {len(stored)} stored edits (ME-PPL above "
             f"{COLLAPSE_THRESHOLD:g} and 2× the unedited).",
             f"- Median denominator with C = I: {_at(medians, (False, 'collapse'), 'denominator')} (collapse) against "
             f"{_at(medians, (False, 'normal'), 'denominator')} (normal); GPT-2-XL: "
             f"{papers.number('median_denominator', 'rome', 'collapse'):.2f} against "
             f"{papers.number('median_denominator', 'rome', 'normal'):.2f}. With C (mom2_adjustment): "
             f"{_at(medians, (True, 'collapse'), 'denominator')} against {_at(medians, (True, 'normal'), 'denominator')}.",
             f"- First-token subjects: {coll.first_token.mean():.0%} of the collapse cases, {share_all:.2%} of "
             f"CounterFact." if len(coll) else "- No collapse case with C = I in the stores.",
             f"- Maximum ME-PPL on ROME's collapse cases: ROME {_at(crome, ('rome', 'collapse'), 'max_ppl', '{:,.0f}')}, "
             f"C-ROME {_at(crome, ('c-rome', 'collapse'), 'max_ppl', '{:,.1f}')} (GPT-2-XL: "
             f"{papers.number('max_ppl', 'rome', 'collapse'):,.2f} and {papers.number('max_ppl', 'c-rome', 'collapse'):,.2f}). "
             f"C-ROME's efficacy there: {_at(crome, ('c-rome', 'collapse'), 'efficacy', '{:.0%}')} bare, "
             f"{_at(crome, ('c-rome-prefix', 'collapse'), 'prefixed_efficacy', '{:.0%}')} behind a test-time prefix "
             f"(GPT-2-XL: {_pct(papers.number('efficacy', 'c-rome', 'collapse'), ' ')} and "
             f"{_pct(papers.number('prefixed_efficacy', 'c-rome-prefix', 'collapse'), ' ')}).",
             f"- Second2First on {s2f_model}: mean ME-PPL after ROME {_s2f(s2f, 'original').mean():,.1f} -> "
             f"{_s2f(s2f, 'second2first').mean():,.1f} (GPT-2-XL: {_s2f_paper()})."]
    if len(c_rows):
        for case, g in c_rows.groupby("case"):
            lines.append(f"- ROME under each way of gathering C, {case} cases: ME-PPL {g.ppl.min():,.0f} to "
                         f"{g.ppl.max():,.0f} ({g.ppl.max() / g.ppl.min():.1f}×; lowest with "
                         f"{g.loc[g.ppl.idxmin(), 'variant']}).")
    for r in guard.itertuples():
        lines.append(f"- Guard on {r.model} (mom2_adjustment={r.mom2_adjustment}), held out: AUROC "
                     f"{r.held_out_auroc:.3f}, precision {r.held_out_precision:.2f}, recall {r.held_out_recall:.2f} on "
                     f"{r.held_out_n} edits ({r.held_out_collapse} collapse); threshold uᵀk^u < {r.threshold_u_k:.3g} "
                     f"from {r.edits - r.held_out_n} other edits (target AUROC ≥ 0.95).")
    lines.append(f"- One guard check costs {check / edit_cost:.1%} of one ROME edit with its ME-PPL (target ≤ 2 %).")
    if hardcf is not None:
        lines.append(f"- HardCF of {study.model}: {hardcf.get('hardcf_size', 'n/a')} confirmed collapse cases among "
                     f"{hardcf.get('screened', 'n/a')} screened; estimated recall of the screen "
                     f"{hardcf.get('recall', float('nan')):.2f} (95 % lower bound "
                     f"{hardcf.get('recall_lower95', float('nan')):.2f}).")
    return "\n".join(lines)
