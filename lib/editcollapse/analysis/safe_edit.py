"""Notebook 06's study (beyond the papers): edit the hard cases so that the edit takes and the model does not
collapse. Every editor on this model's hard cases (the shipped HardCF and HardEdit) and on normal ones, single
and sequential, scored against the targets of the study:

- single edits: bare-prompt efficacy ≥ 0.9, generalisation at least ROME's on normal cases, locality no worse
  than C-ROME's, ME-PPL within 1.2× of the unedited model on every case;
- sequential: every hard case in one sequence with ME-PPL < 2× the unedited model at every step, and the
  earlier edits' efficacy measured at the end (`sequential_run`'s retention rows);
- the same editor on normal cases no worse than ROME.

Cases are split by a seeded hash (`split_of`): settings are tuned on the "tune" half, scores reported on
the "test" half only.
"""
from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pandas as pd

from .. import data
from ..experiments.single import sample_rows, single_edit_sweep
from ..hardcases.hardedit import load_hardedit
from ..models.loading import LoadedModel
from ..paths import in_repo
from ..results.query import select
from ..results.tables import mean_interval, number_text, single_edit_table, wilson_interval

# the scores of the study: the papers' token accuracies (EasyEdit) and ROME's probability comparisons
SCORES = ("efficacy_acc", "generalization_acc", "locality_acc", "efficacy_prob", "generalization_prob",
          "locality_prob")
SINGLE_PPL_RATIO = 1.2  # a single edit keeps ME-PPL within this factor of the unedited model's
SEQUENTIAL_PPL_RATIO = 2.0  # at every step of a sequence
MIN_EFFICACY = 0.9


def split_of(case_id, seed: int = 0) -> str:
    """"tune" or "test": the case's half by a seeded hash of its id (stable across runs, machines and samples)."""
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    return "tune" if digest[0] % 2 == 0 else "test"


def study_samples(model: str, n_normal: int, n_hard: int | None = None, seed: int = 0,
                  hardcf_path="data/hardcf/{model}.json",
                  hardedit_path="data/hardedit/hardedit_{model}.json") -> dict[str, list[dict]]:
    """{"hardcf": the CounterFact cases of `model`'s HardCF, "hardedit": its HardEdit cases, "normal": `n_normal`
    random CounterFact cases (notebook 02's random sample)}: the first `n_hard` of each hard set by case_id (None:
    all); the paths take {model}; a hard set whose file is missing is left out."""
    out = {}
    path = in_repo(hardcf_path.format(model=model))
    if path.exists():
        by_id = {c["case_id"]: c for c in data.load_counterfact()}
        ids = sorted(int(c["case_id"]) for c in json.loads(path.read_text()))
        out["hardcf"] = [by_id[i] for i in ids[:n_hard]]
    path = in_repo(hardedit_path.format(model=model))
    if path.exists():
        out["hardedit"] = sorted(load_hardedit(path), key=lambda c: c["case_id"])[:n_hard]
    out["normal"] = data.load_cases("counterfact", n_normal, seed) if n_normal else []
    return {name: cases for name, cases in out.items() if cases}


def half(samples: dict[str, list[dict]], which: str = "test", seed: int = 0) -> dict[str, list[dict]]:
    """Each sample's cases in the `which` half ("tune" or "test", `split_of`)."""
    return {name: [c for c in cases if split_of(c["case_id"], seed) == which] for name, cases in samples.items()}


def tune_cases(samples: dict[str, list[dict]], n: int, seed: int = 0, hard=("hardcf", "hardedit")) -> list[dict]:
    """`n` hard cases of the tune half, drawn with `seed` (the same cases for every setting of a tuning)."""
    cases = [c for name in hard for c in half(samples, "tune", seed).get(name, [])]
    random.Random(seed).shuffle(cases)
    return cases[:n]


def shares_first_position(lm: LoadedModel, case: dict) -> bool:
    """Whether the case's locality prompt begins with the same token as its edit prompt, with no BOS before it.

    Without BOS the hidden state at position 0 is a function of that token alone, so k^u of a first-token
    subject is the key of *every* prompt that begins with the token: an edit that takes at k^u takes on such a
    locality prompt too, whatever the editor."""
    if lm.spec.prepend_bos:
        return False
    first = [lm.token_ids(case[f])[:1] for f in ("prompt", "locality_prompt")]
    return bool(first[0]) and first[0] == first[1]


def bare_key_cosines(lm: LoadedModel, layer: int, samples: dict[str, list[dict]]) -> pd.DataFrame:
    """Per sample: n, the median (and 10th, 90th percentile) cosine between the bare-prompt keys k^u of two different
    cases at `layer`, and the median ‖k^u‖. Edits of a sequence whose k^u point the same way write over one another."""
    import torch

    from ..models.keys import subject_keys

    out = []
    for name, cases in samples.items():
        if len(cases) < 2:
            continue
        K = subject_keys(lm, layer, cases)
        unit = torch.nn.functional.normalize(K, dim=1)
        cos = (unit @ unit.T)[~torch.eye(len(K), dtype=torch.bool)]
        out.append(dict(sample=name, n=len(cases), cosine_median=cos.median().item(),
                        cosine_q10=cos.quantile(0.1).item(), cosine_q90=cos.quantile(0.9).item(),
                        norm_median=K.norm(dim=1).median().item()))
    return pd.DataFrame(out).set_index("sample")


def locality_by_first_position(lm: LoadedModel, rows: pd.DataFrame, samples: dict[str, list[dict]]) -> pd.DataFrame:
    """Mean locality (token accuracy) and n per (editor, whether the locality prompt shares the edit prompt's
    first position: `shares_first_position`) over `rows`' hard samples."""
    shared = {(c.get("dataset", "counterfact"), c["case_id"]): shares_first_position(lm, c)
              for name, cases in samples.items() if name != "normal" for c in cases}
    hard = rows[rows["sample"] != "normal"]
    hard = hard.assign(shares_first_position=[shared.get((d, c)) for d, c in zip(hard.dataset, hard.case_id)])
    return hard.groupby(["editor", "shares_first_position"]).locality_acc.agg(["mean", "size"]).unstack()


def tuning_table(tuned: pd.DataFrame) -> pd.DataFrame:
    """Mean and max per (editor, setting) of `tune`'s rows: the scores that decide a tuning, ME-PPL ratio and ‖Δ‖."""
    columns = ["efficacy_acc", "generalization_acc", "locality_acc", "ppl_ratio", "delta_norm"]
    return tuned.groupby(["editor", "setting"])[[c for c in columns if c in tuned]].agg(["mean", "max"])


def with_split(rows: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """`rows` with a `split` column ("tune" or "test", `split_of` the case id)."""
    return rows.assign(split=[split_of(c, seed) for c in rows.case_id])


def tune(lm: LoadedModel, editor: str, cases: list[dict], grid: dict[str, dict], store, ppl_size: int = 50,
         ppl_original: float | None = None) -> pd.DataFrame:
    """Single edits of `cases` (the tune half) under each setting of `grid` ({name: hparams}, by `editor` or by
    the editor a setting names as its "editor"), as experiment "tune_<name>" rows of `store` (reused when
    there); returns them with a `setting` column."""
    parts, ids = [], {(c.get("dataset", "counterfact"), c["case_id"]) for c in cases}
    for name, setting in grid.items():
        experiment, hparams = f"tune_{name}", {k: v for k, v in setting.items() if k != "editor"}
        single_edit_sweep(lm, setting.get("editor", editor), cases, store, experiment=experiment, ppl_size=ppl_size,
                          ppl_original=ppl_original, editor_kwargs=dict(hparams=hparams))
        parts.append(select(store, experiment=experiment, model=lm.spec.name, cases=ids).assign(setting=name))
    return pd.concat(parts, ignore_index=True)


def study_rows(store, model: str, editors, samples: dict[str, list[dict]], ppl_size: int = 50,
               seed: int = 0) -> pd.DataFrame:
    """The single-edit rows of `editors` on each sample (`sample_rows`), with their `split`."""
    rows = sample_rows(store, model, editors, samples, ppl_size)
    return with_split(rows, seed) if len(rows) else rows.assign(split=[])


def plot_single(rows: pd.DataFrame, ppl_original: float, editors, path=None):
    """Per sample: each edit's ME-PPL over the unedited model's (log scale; the 1.2× target dashed) and its
    bare-prompt efficacy (token accuracy), editors in the order `editors`. The figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    ok = rows[rows.error.isna()].assign(ppl_ratio=lambda r: r.ppl / ppl_original)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    sns.stripplot(data=ok, x="sample", y="ppl_ratio", hue="editor", hue_order=editors, dodge=True, size=3,
                  ax=axes[0])
    axes[0].axhline(SINGLE_PPL_RATIO, color="red", ls="--", lw=1)
    axes[0].set(yscale="log", ylabel="ME-PPL / unedited", title="every single edit")
    sns.barplot(data=ok, x="sample", y="efficacy_acc", hue="editor", hue_order=editors, ax=axes[1])
    axes[1].axhline(MIN_EFFICACY, color="red", ls="--", lw=1)
    axes[1].set(ylim=(0, 1), ylabel="bare-prompt efficacy (token acc.)", title="does the edit take?")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


def single_table(rows: pd.DataFrame, ppl_original: float, split: str | None = "test") -> pd.DataFrame:
    """Per (editor, sample) over the `split` half (None: all cases): `single_edit_table`'s collapse rate, ME-PPL
    and SCORES with their 95 % intervals, and `within_ppl`: the share of edits whose ME-PPL is within
    SINGLE_PPL_RATIO× the unedited model's (`ppl_original`), with its Wilson interval."""
    part = rows if split is None else rows[rows.split == split]
    table = single_edit_table(part, by=("editor", "sample"), metrics=[s for s in SCORES if s in part])
    ok = part[part.error.isna()] if "error" in part else part
    within = (ok.ppl <= SINGLE_PPL_RATIO * ppl_original).groupby([ok.editor, ok["sample"]]).agg(["sum", "size"])
    within = within.reindex(table.index)
    table["max_ppl_ratio"] = table.max_ppl / ppl_original
    table["within_ppl"] = within["sum"] / within["size"]
    spans = [wilson_interval(k, n) for k, n in zip(within["sum"].fillna(0), within["size"].fillna(0))]
    table["within_ppl_lo"], table["within_ppl_hi"] = [s[0] for s in spans], [s[1] for s in spans]
    return table


def _ratio(x: float) -> str:
    """A perplexity ratio as the README writes it: 1.97×, or 182,390× from 100 on (`tables.number_text`)."""
    return f"{number_text(x)}×"


def readme_rows(single: pd.DataFrame, editor: str, labels: dict[str, str]) -> list[str]:
    """The README's table rows of `editor` from `single_table`: per sample (`labels`: {sample: label}) n, collapsed,
    bare-prompt efficacy with its 95 % interval, edits within SINGLE_PPL_RATIO× ME-PPL, the largest ratio,
    generalisation and locality (token accuracies)."""
    out = []
    for sample, label in labels.items():
        if (editor, sample) not in single.index:
            continue
        r = single.loc[(editor, sample)]
        within = int(round(r.within_ppl * r.edits))
        out.append(f"| {label} | {int(r.edits)} | {int(r.collapsed)} | {r.efficacy_acc:.2f} ({r.efficacy_acc_lo:.2f}–"
                   f"{r.efficacy_acc_hi:.2f}) | {within} of {int(r.edits)} | {_ratio(r.max_ppl_ratio)} | "
                   f"{r.generalization_acc:.2f} | {r.locality_acc:.2f} |")
    return out


def sequential_table(steps: pd.DataFrame, retention: pd.DataFrame, ppl_original: float) -> pd.DataFrame:
    """Per (editor, run): steps done, the largest ME-PPL ratio to the unedited model over the run, the first step
    beyond SEQUENTIAL_PPL_RATIO× (NaN: none), the mean bare-prompt efficacy of each step's own edit, and the
    earlier edits' efficacy at the end (retention rows, with their 95 % interval and n)."""
    out = []
    for (editor, run), s in steps.groupby(["editor", "run"]):
        s = s.sort_values("step")
        over = s[s.ppl > SEQUENTIAL_PPL_RATIO * ppl_original]
        kept = select(retention, editor=editor, run=run) if len(retention) else retention
        row = dict(editor=editor, run=run, steps=int(s.step.max()), refused=int(s.error.notna().sum()),
                   max_ppl_ratio=float(s.ppl.max() / ppl_original),
                   first_step_over=float(over.step.min()) if len(over) else np.nan,
                   efficacy_acc_when_edited=float(s.efficacy_acc.mean()) if "efficacy_acc" in s else np.nan,
                   retained_n=len(kept))
        if len(kept):
            row["retained_efficacy_acc"] = float(kept.efficacy_acc.mean())
            row["retained_efficacy_acc_lo"], row["retained_efficacy_acc_hi"] = mean_interval(
                kept.efficacy_acc, bounds=(0.0, 1.0))
            row["retained_efficacy_prob"] = float(kept.efficacy_prob.mean())
        out.append(row)
    return pd.DataFrame(out).set_index(["editor", "run"]) if out else pd.DataFrame()


def readme_sequential_rows(sequential: pd.DataFrame, labels: dict[str, str], run: str = "hard_test") -> list[str]:
    """The README's rows of `sequential_table` for `run`, per editor (`labels`: {editor: label}): steps, the first
    step beyond SEQUENTIAL_PPL_RATIO× ("none"), the largest ME-PPL ratio, each step's own efficacy when made and
    the earlier edits' efficacy at the end with its 95 % interval (token accuracies)."""
    out = []
    for editor, label in labels.items():
        if (editor, run) not in sequential.index:
            continue
        r = sequential.loc[(editor, run)]
        first = "none" if np.isnan(r.first_step_over) else f"{int(r.first_step_over)}"
        out.append(f"| {label} | {int(r.steps)} | {first} | {_ratio(r.max_ppl_ratio)} | {r.efficacy_acc_when_edited:.2f} | "
                   f"{r.retained_efficacy_acc:.2f} ({r.retained_efficacy_acc_lo:.2f}–{r.retained_efficacy_acc_hi:.2f}) |")
    return out


def targets(single: pd.DataFrame, editor: str, sequential: pd.DataFrame | None = None,
            hard=("hardcf", "hardedit")) -> pd.DataFrame:
    """The study's targets for `editor`, each with the measured value, what it is held against, and whether it is
    met (`single`: `single_table`; `sequential`: `sequential_table`). A target whose rows are missing is NaN."""
    def get(ed, sample, col):
        key = (ed, sample)
        return float(single.loc[key, col]) if key in single.index and col in single else np.nan

    rows = []
    for sample in hard:
        rows += [
            dict(target=f"{sample}: bare-prompt efficacy ≥ {MIN_EFFICACY}", value=get(editor, sample, "efficacy_acc"),
                 against=MIN_EFFICACY, met=get(editor, sample, "efficacy_acc") >= MIN_EFFICACY),
            dict(target=f"{sample}: generalisation ≥ ROME's on normal cases",
                 value=get(editor, sample, "generalization_acc"), against=get("rome", "normal", "generalization_acc"),
                 met=get(editor, sample, "generalization_acc") >= get("rome", "normal", "generalization_acc")),
            dict(target=f"{sample}: locality ≥ C-ROME's", value=get(editor, sample, "locality_acc"),
                 against=get("c-rome", sample, "locality_acc"),
                 met=get(editor, sample, "locality_acc") >= get("c-rome", sample, "locality_acc")),
            dict(target=f"{sample}: every edit within {SINGLE_PPL_RATIO}× the unedited ME-PPL",
                 value=get(editor, sample, "within_ppl"), against=1.0, met=get(editor, sample, "within_ppl") == 1.0),
        ]
    for col in ("efficacy_acc", "generalization_acc", "locality_acc"):
        rows.append(dict(target=f"normal: {col} ≥ ROME's", value=get(editor, "normal", col),
                         against=get("rome", "normal", col), met=get(editor, "normal", col) >= get("rome", "normal", col)))
    rows.append(dict(target="normal: largest ME-PPL ≤ ROME's", value=get(editor, "normal", "max_ppl_ratio"),
                     against=get("rome", "normal", "max_ppl_ratio"),
                     met=get(editor, "normal", "max_ppl_ratio") <= get("rome", "normal", "max_ppl_ratio")))
    if sequential is not None and len(sequential):
        for run in sequential.loc[editor].index if editor in sequential.index.get_level_values(0) else ():
            r = sequential.loc[(editor, run)]
            rows.append(dict(target=f"sequential {run}: ME-PPL < {SEQUENTIAL_PPL_RATIO}× at every step",
                             value=r.max_ppl_ratio, against=SEQUENTIAL_PPL_RATIO,
                             met=r.max_ppl_ratio < SEQUENTIAL_PPL_RATIO))
    table = pd.DataFrame(rows)
    table["met"] = table.met.astype(object).where(table.value.notna() & table.against.notna(), None)
    return table
