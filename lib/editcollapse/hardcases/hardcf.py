"""HardCF (Butterfly Effect paper, Sec. 5): the CounterFact cases that one ROME edit collapses, for any model.

A sweep's collapse cases (`sweep_hardcf`), or the guard's pipeline over the whole data set (`build`):

1. `screen`: the guard's score −log(uᵀk^u) of every case, keys only, into a ResultStore (resumable);
2. a labelled sweep (first-token cases and a random sample, edited and measured) calibrates the guard's
   threshold on half of its cases and judges it on the other half (`guard.calibrate`, `guard.evaluate`);
3. `confirmation_plan`: every flagged case, the margin below the threshold and a uniform sample of the rest
   are edited (`sweep_missing`: edits already in any of EDIT_STORES are reused); `recall_estimate` gives
   the screen's recall from them;
4. `write_hardcf`: the confirmed collapse cases as CounterFact records (data/hardcf/SOURCE.md).

`write_hard_cases` is the one writer of hard-case JSON. Command line: `python -m editcollapse.cli.guard`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import data
from ..editors import ROME, Editor, get_editor
from ..eval.perplexity import me_ppl
from ..experiments.single import first_token_cases, results_store, single_edit_sweep
from ..guard import assess, key_features, key_site, label_rows, rescore, sweep_of
from ..models.loading import LoadedModel
from ..paths import atomic_write_text, in_repo
from ..results.labels import COLLAPSE_THRESHOLD, is_collapsed
from ..results.query import select
from ..results.store import ROW_KEY

# Result stores (under results_dir) holding single-edit rows: the notebooks' store and the guard jobs' own.
EDIT_STORES = ("single_edit", "guard_confirm", "guard_eval")


# ---------------------------------------------------------------- hard-case JSON
def write_hard_cases(path, hard: pd.DataFrame, record: Callable[[tuple], dict]) -> list[dict]:
    """The hard cases, highest perplexity first: `record(row)` of each row of `hard` (a row of
    `itertuples()`, with `ppl`); JSON at `path`, written atomically (None: not written)."""
    out = [record(r) for r in hard.sort_values("ppl", ascending=False).itertuples()]
    if path is not None:
        atomic_write_text(in_repo(path), json.dumps(out, indent=1, ensure_ascii=False))
    return out


def sweep_hardcf(rows: pd.DataFrame, path: str | Path | None = None,
                 threshold: float = COLLAPSE_THRESHOLD) -> list[dict]:
    """Collapse cases (`is_collapsed`) of the successful edits of a CounterFact sweep (pandas rows) in CounterFact
    format, with their model, editor, perplexity and first_token."""
    cf = {c["case_id"]: c for c in data.load_counterfact()}
    edits = select(rows, ok=True, dataset="counterfact")
    hard = edits[is_collapsed(edits.ppl.astype(float), threshold)] if len(edits) else edits
    return write_hard_cases(path, hard, lambda r: dict(cf[int(r.case_id)], model=r.model, editor=r.editor,
                                                        ppl=float(r.ppl), first_token=bool(r.first_token)))


def write_hardcf(path, confirmed: pd.DataFrame, cases: dict[int, dict], meta: dict) -> list[dict]:
    """The confirmed collapse cases as CounterFact records (data/CounterFact's fields) plus the model, editor,
    ME-PPL_50, the screen's denominator, uᵀk^u and score, first_token and stratum; JSON at `path`."""
    return write_hard_cases(path, confirmed[confirmed.label.astype(bool)], lambda r: dict(
        {k: v for k, v in cases[int(r.case_id)].items() if k != "dataset"}, model=meta["model"],
        editor=meta["editor"], ppl=float(r.ppl), denominator=float(r.denominator), u_k=float(r.denominator_raw),
        guard_score=float(r.score), first_token=bool(r.first_token), stratum=r.stratum))


# ---------------------------------------------------------------- the screen and the edits
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


def screen_rows(store, experiment: str, model: str) -> pd.DataFrame:
    """The rows of one screen in `store`, rescored (`guard.rescore`)."""
    rows = store.read()
    return rows if rows.empty else rescore(select(rows, experiment=experiment, model=model))


def edit_rows(results_dir="results", stores=EDIT_STORES) -> pd.DataFrame:
    """Single-edit rows of every store in `stores` that exists under `results_dir`; a key in several keeps the first."""
    parts = [select(results_store(results_dir, n)) for n in stores if (in_repo(results_dir) / f"{n}.jsonl").exists()]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, ignore_index=True).drop_duplicates(list(ROW_KEY)).reset_index(drop=True)


def sweep_missing(lm: LoadedModel, editor_name: str, cases: list[dict], store, results_dir="results",
                  **sweep) -> int:
    """`single_edit_sweep` into `store` of the cases that no store of EDIT_STORES holds yet (in the given order;
    with retry_errors=True, also those held as error rows only)."""
    name = get_editor(editor_name, **sweep.get("editor_kwargs", {}) or {}).name
    rows = select(edit_rows(results_dir), ok=bool(sweep.get("retry_errors")),
                  experiment=sweep.get("experiment", "single_edit"), model=lm.spec.name, editor=name)
    done = set(rows.case_id.astype(int)) if len(rows) else set()
    todo = [c for c in cases if int(c["case_id"]) not in done]
    if todo:
        single_edit_sweep(lm, editor_name, todo, store, **sweep)
    return len(todo)


# ---------------------------------------------------------------- confirmation and recall
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
    p = (LogisticRegression().fit(x[done], y).predict_proba(x[~done])[:, 1] if 0 < y.sum() < len(y) and (~done).any()
         else np.full((~done).sum(), float(y.mean()) if len(y) else np.nan))
    flagged_left = (m.stratum[~done] == "flagged").to_numpy()
    caught_model = f["collapse"] + p[flagged_left].sum()
    missed_model = mg["collapse"] + r["collapse"] + p[~flagged_left].sum()
    return dict(strata=counts, caught=caught, missed_estimate=missed, missed_upper95=missed_hi,
                recall=caught / (caught + missed) if caught + missed else float("nan"),
                recall_lower95=caught / (caught + missed_hi) if caught + missed_hi else float("nan"),
                precision=f["collapse"] / f["edited"] if f["edited"] else float("nan"),
                caught_model=float(caught_model), missed_model=float(missed_model),
                recall_model=float(caught_model / (caught_model + missed_model)) if caught_model + missed_model
                else float("nan"))


def confirmation_order(plan: pd.DataFrame, random_ids: list[int]) -> list[int]:
    """The planned edits: flagged and margin in the guard's order (by score), then the rest in the sample's random
    order, so that an interrupted run leaves a uniform subsample of the rest."""
    order = plan[plan.edit]
    rest = order[order.stratum == "rest"].set_index("case_id")
    order = pd.concat([order[order.stratum != "rest"], rest.loc[[i for i in random_ids if i in rest.index]].reset_index()])
    return [int(i) for i in order.case_id]


def threshold_summary(lm: LoadedModel, measured: pd.DataFrame, features: pd.DataFrame, editor: Editor) -> dict:
    """`guard.assess` of `measured` (single-edit rows) scored by `features`, as the summary reports it."""
    _, m = assess(lm, measured, editor, features=features)
    return dict(threshold_score=m["threshold"], threshold_u_k=m["threshold_u_k"],
                threshold_source="calibrated" if m["calibrated"] else "default: no collapse among the calibration edits",
                calibration=m["calibration"], held_out=m["held_out"])


# ---------------------------------------------------------------- the whole pipeline
def build(lm: LoadedModel, results_dir, edits: str = "single_edit", out=None, n_labelled: int = 40,
          n_first: int | None = None, n_low: int = 0, low_from: str | None = None, n_random: int = 80,
          n_margin: int = 20, max_flagged: int | None = 150, max_confirm: int | None = None,
          screen_n: int | None = None, no_screen: bool = False, mom2: bool = False, mom2_tokens: int = 100_000,
          batch_size: int = 64, screen_contexts: int | None = None) -> dict:
    """The screen, the labelled sweep, the guard's evaluation, the confirmation edits and the HardCF of a model
    (`python -m editcollapse.cli.guard --help` says what each setting does); returns the summary, which goes
    with the HardCF JSON to `out` (None or '': nowhere)."""
    t0 = time.time()
    hparams = dict(mom2_adjustment=True, mom2_n_tokens=mom2_tokens) if mom2 else {}
    suffix = "_mom2" if mom2 else ""
    editor = ROME(hparams=hparams)
    experiment = f"single_edit_ppl50{suffix}"
    original = me_ppl(lm, 50, progress=False)["mean"]
    cf = data.load_counterfact()
    by_id = {c["case_id"]: c for c in cf}
    edit_store = results_store(results_dir, edits)
    sweep = dict(results_dir=results_dir, experiment=experiment, ppl_size=50, ppl_original=original,
                 editor_kwargs=dict(hparams=hparams))
    screen_store = results_store(results_dir, "guard_screen")
    screen_exp = f"guard_screen{suffix}" + (f"_ctx{screen_contexts}" if screen_contexts else "")
    first = first_token_cases(lm, cf, len(cf) if n_first is None else n_first, seed=0)
    labelled_cases = {c["case_id"]: c for c in first + data.load_counterfact(n=n_labelled, seed=0)}
    whole = not no_screen and screen_n is None
    t1 = time.time()
    if not no_screen:
        to_screen = cf if whole else list({c["case_id"]: c for c in data.load_counterfact(n=screen_n, seed=0)
                                           + list(labelled_cases.values())}.values())
        screen(lm, to_screen, screen_store, editor, experiment=screen_exp, batch_size=batch_size,
               n_contexts=screen_contexts)
    screen_seconds = time.time() - t1
    screened = screen_rows(screen_store, screen_exp, lm.spec.name)
    if n_low:
        pool = screened if low_from is None else screen_rows(screen_store, low_from, lm.spec.name)
        if pool.empty:
            raise SystemExit(f"--n-low needs a screen of {lm.spec.name}: none in {screen_store.path}")
        low = pool[pool.error.isna()].sort_values("score", ascending=False).case_id.astype(int)[:n_low]
        labelled_cases.update({i: by_id[i] for i in low})
    labelled_cases = sorted(labelled_cases.values(), key=lambda c: c["case_id"])
    print(f"[guard] {lm.spec.name}: ME-PPL_50 {original:.2f}; {len(first)} first-token cases; labelled sweep of "
          f"{len(labelled_cases)} ROME edits{' with mom2' if mom2 else ''}; screen {len(screened)} cases", flush=True)
    sweep_missing(lm, "rome", labelled_cases, edit_store, **sweep)
    summary = dict(model=lm.spec.name, editor="rome", mom2_adjustment=mom2, ppl_original=original,
                   collapse_rule=f"ME-PPL_50 > {COLLAPSE_THRESHOLD:g} and > 2x the unedited {original:.2f}",
                   score="-log(u^T k^u)", screen_experiment=screen_exp, screen_contexts=screen_contexts,
                   screen_seconds_this_run=screen_seconds)
    measured = sweep_of(edit_rows(results_dir), lm.spec.name, experiment)
    exact = key_features(lm, [by_id[i] for i in measured.case_id.astype(int)], editor, batch_size=batch_size)
    for name, feats in (("guard", exact), ("screen", screened)):
        if not feats.empty:
            summary[name] = threshold_summary(lm, measured, feats, editor)
            print(f"[guard] {name}: {summary[name]}", flush=True)
    if whole:
        random_ids = [c["case_id"] for c in data.load_counterfact(n=n_random, seed=0)]
        plan = confirmation_plan(screened, summary["screen"]["threshold_score"], n_margin, random_ids, max_flagged)
        todo = confirmation_order(plan, random_ids)
        done = set(measured.case_id.astype(int))  # no edit ran since it was read
        pending = [by_id[i] for i in todo if i not in done]
        run_now = pending if max_confirm is None else pending[:max_confirm]
        print(f"[guard] confirmation: {int((plan.stratum == 'flagged').sum())} flagged, {len(todo)} edits planned, "
              f"{len(todo) - len(pending)} done before, {len(run_now)} to run now", flush=True)
        sweep_missing(lm, "rome", run_now, edit_store, **sweep)
        measured = label_rows(sweep_of(edit_rows(results_dir), lm.spec.name, experiment), screened)
        confirmed = plan.merge(measured[["case_id", "ppl", "label"]], on="case_id")
        summary.update(screened=len(screened), screen_errors=int(screened.error.notna().sum()),
                       first_token_cases=len(first), planned_edits=len(todo),
                       unconfirmed=len(todo) - int(plan[plan.edit].case_id.isin(measured.case_id).sum()),
                       **recall_estimate(plan, measured))
        if out:
            hard = write_hardcf(f"{out}/{lm.spec.name}{suffix}.json", confirmed, by_id,
                                dict(model=lm.spec.name, editor="rome"))
            summary["hardcf_size"] = len(hard)
    summary["seconds"] = time.time() - t0
    print("[guard] " + json.dumps(summary, default=float), flush=True)
    if out:
        atomic_write_text(in_repo(f"{out}/{lm.spec.name}{suffix}.summary.json"),
                          json.dumps(summary, indent=1, default=float))
    return summary
