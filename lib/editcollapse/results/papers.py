"""The papers' reference numbers, once, as data with their source, and the papers-against-ours table.

- *Butterfly*: Yang et al., "The Butterfly Effect of Model Editing: Few Edits Can Trigger Large Language
  Models Collapse", ACL 2024 Findings.
- *Fall*: Yang et al., "The Fall of ROME: Understanding the Collapse of LLMs in Model Editing", EMNLP 2024
  Findings.

A number is keyed by (quantity, editor, cases): `cases` is ROME's label of the edited case (collapse /
normal; HardCF cases are ROME's collapse cases), the Second2First mode, or the sequential run (hard /
normal). `reference()` gives them, `number(...)` one of them, `versus(model, ...)` sets ours beside them.
"""
from __future__ import annotations

import pandas as pd

from .labels import COLLAPSE_THRESHOLD, is_collapsed
from .query import select
from .tables import perplexity_text

BUTTERFLY = "Butterfly Effect (ACL 2024 Findings)"
FALL = "Fall of ROME (EMNLP 2024 Findings)"
MODELS = ("gpt2-xl", "gpt-j-6b", "llama2-7b")

_SEQUENTIAL = (BUTTERFLY, "Sec. 4.2, table of downstream scores after sequential editing: ME-PPL_1k after the "
                          "107 edits (Llama-2-7b only)")
_PARTS = (FALL, "Sec. 3, table of numerator and denominator of ROME's update (medians)")
_MAX_PPL = (FALL, "Sec. 3, table of the maximum perplexity of models edited by ROME and C-ROME")
_LOW = (FALL, "Sec. 5, table of C-ROME's efficacy (tested without a prefix)")
_PREFIX = (FALL, "Sec. 5, table of C-ROME tested behind a prefix")
_S2F = (FALL, "Sec. 4, table of Second2First (perplexity after ROME on the collapse cases)")
_HARDCF = (BUTTERFLY, "Sec. 3, HardCF: CounterFact cases that one ROME edit collapses")

# (source, quantity, editor, cases, values in the order of MODELS; None: not reported)
_NUMBERS = (
    (_HARDCF, "hardcf_size", "rome", "collapse", (77, 85, 21)),
    (_PARTS, "median_numerator", "rome", "collapse", (168.55, 140.27, 4.57)),
    (_PARTS, "median_numerator", "rome", "normal", (79.91, 88.69, 16.52)),
    (_PARTS, "median_denominator", "rome", "collapse", (0.04, 0.04, 0.01)),
    (_PARTS, "median_denominator", "rome", "normal", (9.60, 12.78, 2.63)),
    (_MAX_PPL, "max_ppl", "unedited", "", (68.77, 49.04, 33.18)),
    (_MAX_PPL, "max_ppl", "rome", "collapse", (26084.66, 25909.24, 10574.76)),
    (_MAX_PPL, "max_ppl", "rome", "normal", (74.32, 50.77, 36.68)),
    (_MAX_PPL, "max_ppl", "c-rome", "collapse", (70.71, 51.77, 33.20)),
    (_MAX_PPL, "max_ppl", "c-rome", "normal", (70.28, 50.57, 33.55)),
    (_LOW, "efficacy", "c-rome", "collapse", (0.0519, 0.3059, 0.1865)),
    (_LOW, "generalization", "c-rome", "collapse", (0.1429, 0.3077, 0.1270)),
    (_LOW, "locality", "c-rome", "collapse", (0.9740, 0.8235, 1.0)),
    (_PREFIX, "prefixed_efficacy", "c-rome-prefix", "collapse", (1.0, 1.0, 0.9127)),
    (_PREFIX, "prefixed_efficacy", "c-rome-prefix", "normal", (0.9616, 0.9977, 0.9195)),
    (_PREFIX, "prefixed_generalization", "c-rome-prefix", "collapse", (0.1688, 0.3294, 0.2937)),
    (_PREFIX, "prefixed_generalization", "c-rome-prefix", "normal", (0.4188, 0.5000, 0.4673)),
    (_PREFIX, "prefixed_locality", "c-rome-prefix", "collapse", (1.0, 0.8941, 1.0)),
    (_PREFIX, "prefixed_locality", "c-rome-prefix", "normal", (0.9734, 0.9561, 0.9756)),
    (_S2F, "min_ppl", "rome", "original", (2177.82, 5094.73, 16279.75)),
    (_S2F, "mean_ppl", "rome", "original", (19877.79, 28835.21, 67436.51)),
    (_S2F, "max_ppl", "rome", "original", (179185.99, 85936.24, 206307.60)),
    (_S2F, "min_ppl", "rome", "second2first", (1008.21, 8153.70, 17561.97)),
    (_S2F, "mean_ppl", "rome", "second2first", (1397.87, 26978.14, 72692.50)),
    (_S2F, "max_ppl", "rome", "second2first", (2153.86, 124982.41, 349577.58)),
    (_SEQUENTIAL, "sequential_ppl_end", "unedited", "", (None, None, 37.25)),
    (_SEQUENTIAL, "sequential_ppl_end", "ft-linf", "hard", (None, None, 2.12e3)),
    (_SEQUENTIAL, "sequential_ppl_end", "ft-linf", "normal", (None, None, 2.17e3)),
    (_SEQUENTIAL, "sequential_ppl_end", "mend", "hard", (None, None, 4.07e4)),
    (_SEQUENTIAL, "sequential_ppl_end", "mend", "normal", (None, None, 4.46e4)),
    (_SEQUENTIAL, "sequential_ppl_end", "rome", "hard", (None, None, 1.19e11)),
    (_SEQUENTIAL, "sequential_ppl_end", "rome", "normal", (None, None, 3.75e1)),
    (_SEQUENTIAL, "sequential_ppl_end", "memit", "hard", (None, None, 6.85e4)),
    (_SEQUENTIAL, "sequential_ppl_end", "memit", "normal", (None, None, 9.98e1)),
)
KEY = ["quantity", "editor", "cases"]
# our single-edit rows' column behind each quantity, and how a group of rows gives it
_SINGLE = {"median_numerator": ("numerator_norm", "median"), "median_denominator": ("denominator", "median"),
           "max_ppl": ("ppl", "max"), "efficacy": ("efficacy", "mean"), "generalization": ("generalization", "mean"),
           "locality": ("locality", "mean"), "prefixed_efficacy": ("prefixed_efficacy", "mean"),
           "prefixed_generalization": ("prefixed_generalization", "mean"),
           "prefixed_locality": ("prefixed_locality", "mean")}


def reference(model: str | None = None) -> pd.DataFrame:
    """The papers' numbers: paper, source, quantity, editor, cases, model, value (of `model` only, where given)."""
    if model is not None and model not in MODELS:
        raise ValueError(f"the papers report {MODELS}, not {model!r}")
    table = pd.DataFrame([dict(paper=paper, source=source, quantity=q, editor=e, cases=c, model=m, value=v)
                          for (paper, source), q, e, c, values in _NUMBERS for m, v in zip(MODELS, values)
                          if v is not None])
    return table if model is None else select(table, model=model)


def number(quantity: str, editor: str, cases: str, model: str = "gpt2-xl") -> float:
    """One of the papers' numbers, e.g. number("max_ppl", "rome", "collapse") = 26,084.66 (Fall, GPT-2-XL)."""
    hit = select(reference(model), quantity=quantity, editor=editor).query("cases == @cases")
    if hit.empty:
        raise KeyError(f"the papers report no {quantity} of {editor} on {cases or 'the unedited model'} for {model}")
    return float(hit.value.iloc[0])


def _tidy(values: dict) -> pd.DataFrame:
    """{(quantity, editor, cases): value} as rows."""
    table = pd.DataFrame([dict(zip(KEY, k), value=float(v)) for k, v in values.items()], columns=KEY + ["value"])
    return table.astype({"value": float})


def _single_edit(rows: pd.DataFrame, ppl_original, threshold) -> pd.DataFrame:
    """Per (editor, ROME's label of the case): the `_SINGLE` quantities over the successful edits."""
    ok = select(rows, ok=True)
    rome = select(ok, editor="rome")
    flags = is_collapsed(rome.ppl.astype(float).to_numpy(), threshold, ppl_original) if len(rome) else []
    label = {k: "collapse" if f else "normal" for k, f in zip(zip(rome.dataset, rome.case_id), flags)}
    cases = pd.Series([label.get(k) for k in zip(ok.dataset, ok.case_id)], index=ok.index, dtype=object)
    out = {}
    for (editor, case), g in ok[cases.notna()].groupby([ok.editor, cases]):
        for quantity, (column, how) in _SINGLE.items():
            if column in g and g[column].notna().any():
                out[(quantity, editor, case)] = g[column].agg(how)
    if ppl_original is not None:
        out[("max_ppl", "unedited", "")] = ppl_original
    return _tidy(out)


def _second2first(rows: pd.DataFrame) -> pd.DataFrame:
    """ROME's perplexity (min, mean, max) per mode (`keyspace.second2first_rows`)."""
    return _tidy({(f"{how}_ppl", "rome", mode): g.ppl.agg(how) for mode, g in rows.groupby("mode")
                  for how in ("min", "mean", "max")})


def _sequential(steps: pd.DataFrame) -> pd.DataFrame:
    """Perplexity at each run's last step (`tables.sequential_rows`), and the unedited model's at step 0: on
    ME-PPL_1k, the paper's corpus, where the run measured it there (`ppl_1000`), else on the run's own size."""
    ppl = steps.ppl_1000.fillna(steps.ppl) if "ppl_1000" in steps else steps.ppl
    last = steps.step == steps.groupby(["editor", "run"]).step.transform("max")
    out = {("sequential_ppl_end", e, r): p for e, r, p in zip(steps.editor[last], steps.run[last], ppl[last])}
    if (steps.step == 0).any():
        out[("sequential_ppl_end", "unedited", "")] = ppl[steps.step == 0].iloc[0]
    return _tidy(out)


def versus(model: str, single_edit: pd.DataFrame | None = None, second2first: pd.DataFrame | None = None,
           sequential: pd.DataFrame | None = None, ppl_original: float | None = None,
           threshold: float = COLLAPSE_THRESHOLD) -> pd.DataFrame:
    """Ours beside the papers' numbers for `model` (one of MODELS): one row per number that the papers report
    for the kinds of rows given; columns quantity, editor, cases, ours (NaN where our rows have none), paper,
    source.

    `single_edit`: single-edit rows of one model and experiment (ROME, C-ROME, C-ROME behind a prefix, ...),
    each case labelled by ROME's edit of it (`labels.is_collapsed`, with `ppl_original`, the unedited
    perplexity, where given); `second2first`: `keyspace.second2first_rows`; `sequential`: the steps of
    sequential runs named hard and normal (`tables.sequential_rows`)."""
    kinds = [(single_edit, lambda r: _single_edit(r, ppl_original, threshold), (_PARTS, _MAX_PPL, _LOW, _PREFIX)),
             (second2first, _second2first, (_S2F,)), (sequential, _sequential, (_SEQUENTIAL,))]
    given = [(rows, ours, sources) for rows, ours, sources in kinds if rows is not None]
    ours = pd.concat([ours(rows) for rows, ours, _ in given] or [_tidy({})], ignore_index=True)
    sources = {source for _, _, s in given for _, source in s}
    paper = reference(model)
    paper = paper[paper.source.isin(sources)].assign(source=lambda t: t.paper + ", " + t.source)
    table = paper.merge(ours.rename(columns={"value": "ours"}), on=KEY, how="left")
    return table[KEY + ["ours", "value", "source"]].rename(columns={"value": "paper"})


def sequential_lines(table: pd.DataFrame, steps: pd.DataFrame, labels: dict[str, str]) -> list[str]:
    """The README's rows of `versus(..., sequential=...)` for the runs we have, in the order of `labels`
    ({editor: label}): the paper's ME-PPL_1k after its 107 edits beside ours after `steps`' (`tables.
    collapse_steps`) number of edits, with the step where ours first collapsed."""
    rows = table.set_index(KEY)
    out = []
    for editor, label in labels.items():
        for run, cases in (("hard", "HardCF"), ("normal", "normal")):
            key = ("sequential_ppl_end", editor, run)
            if key not in rows.index or pd.isna(rows.loc[key, "ours"]) or (editor, run) not in steps.index:
                continue
            s = steps.loc[(editor, run)]
            when = "" if pd.isna(s.first_collapse_step) else f"; collapsed at step {int(s.first_collapse_step)}"
            out.append(f"| ME-PPL_1k after {label}'s sequence of {cases} cases | {perplexity_text(rows.loc[key, 'paper'], 2, 1e4)} "
                       f"(107 edits) | {perplexity_text(rows.loc[key, 'ours'])} ({int(s.steps)} edits{when}) |")
    return out
