"""Experiments as plain functions over (model, editor, cases, store): one row per case, resumable.

- `single_edit_row`: apply one edit to the unedited model, measure edit metrics, ME-PPL
  perplexity and the update's diagnostics, undo. The Butterfly-Effect paper's single editing
  (Sec. 4): every edit starts from the original model.
- `single_edit_sweep`: that row for many cases into a `ResultStore`, skipping cases already
  done (a killed run restarts where it stopped); an edit that failed for a reason other than its
  case (`FailedEdit`) is not stored, so that a rerun retries it.
- `first_token_cases` / `quick_sample`: the cases where collapse is expected ("The Fall of
  ROME", Sec. 3: the subject is the first token of the prompt) mixed with random ones.
- `edit_samples` / `counterfact_cases` / `sweep_samples` / `sample_rows`: notebook 02's named samples (random CounterFact,
  first-token, this model's shipped HardCF, zsRE), edited by every editor, and their rows with a
  `sample` column (a case in two samples counts in both).
- `bos_contrast`: the papers' contrast of a model without BOS and one with it: single edits of random
  and first-token cases on both, as rows with `sample`.
"""
from __future__ import annotations

import json
import random
import time
import weakref
from pathlib import Path

from tqdm.auto import tqdm

from .. import data

from ..eval import metrics, perplexity
from ..editors import EditError, EditRequest, get_editor
from ..models.tokens import subject_last_index
from ..models.loading import LoadedModel
from ..paths import data_dir, in_repo
from ..results.labels import COLLAPSE_THRESHOLD, is_collapsed
from ..results.query import select
from ..results.store import ROW_KEY, ResultStore, run_cases

CASE_COLUMNS = ("case_id", "dataset", "subject", "prompt", "target_new", "ground_truth")


# {tokenizer: {(prepend_bos, prompt, subject): is first token}}: the answer depends on nothing else, and notebooks
# ask it of all of CounterFact several times (about 5 s a scan on SmolLM2)
_FIRST_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def subject_is_first_token(lm: LoadedModel, case: dict) -> bool:
    """True when the subject is one token at the very start of the prompt (after BOS, if any)."""
    memo = _FIRST_TOKEN.setdefault(lm.tok, {})
    key = (bool(lm.spec.prepend_bos), case.get("prompt"), case.get("subject"))
    if key not in memo:
        try:
            tmpl = EditRequest.from_case(case).template()
            memo[key] = tmpl.startswith("{}") and subject_last_index(lm, tmpl, case["subject"]) == int(key[0])
        except EditError:
            memo[key] = False
    return memo[key]


def first_token_cases(lm: LoadedModel, cases: list[dict], n: int, seed: int = 0) -> list[dict]:
    """A seeded sample of `n` cases whose subject is the prompt's first token (nested in n)."""
    hits = [c for c in cases if subject_is_first_token(lm, c)]
    random.Random(seed).shuffle(hits)
    return sorted(hits[:n], key=lambda c: c["case_id"])


def quick_sample(lm: LoadedModel, dataset: str, n_random: int | None, n_first_token: int = 0,
                 seed: int = 0) -> list[dict]:
    """`n_random` random cases plus `n_first_token` first-token cases, without duplicates, by case_id.

    Samples are nested: with one seed, smaller sizes pick a subset of larger ones, so notebooks
    sharing a results store reuse each other's edits.
    """
    chosen = {c["case_id"]: c for c in data.load_cases(dataset, n_random, seed)} if n_random != 0 else {}
    if n_first_token:
        chosen.update({c["case_id"]: c for c in first_token_cases(lm, data.load_cases(dataset), n_first_token, seed)})
    return sorted(chosen.values(), key=lambda c: c["case_id"])


def apply_case(lm: LoadedModel, apply, case: dict):
    """The case's request, validated, and the locality reference of the model before the edit; then
    `apply(request)`. Returns (EditResult, reference). Raises EditError for a bad case."""
    request = EditRequest.from_case(case)
    request.validate()
    reference = metrics.locality_reference(lm, case)
    return apply(request), reference


class FailedEdit(RuntimeError):
    """An edit that failed for a reason other than its case (e.g. out of memory, an error while measuring):
    a sweep stores no row for it, so that a rerun retries it."""


def single_edit_row(lm: LoadedModel, editor, case: dict, ppl_size: int = 50, ppl_original: float | None = None,
                    threshold: float = COLLAPSE_THRESHOLD, raise_failures: bool = False) -> dict:
    """Edit, measure, undo. Returns a flat row: the case, edit metrics, ME-PPL perplexity, and the
    result's scalar diagnostics (the common ones and whatever this editor reports).

    A refused edit (a ValueError, EditError included: a bad case or an edit the editor will not make)
    gives a row with `error` set (and the model untouched), never an exception, so that a sweep goes
    on. Any other failure, while editing or measuring, gives such a row too, or with `raise_failures`
    a `FailedEdit` (what sweeps use). KeyboardInterrupt still stops it.
    """
    case = case if isinstance(case, dict) else {}
    row = {k: case.get(k) for k in CASE_COLUMNS}
    row.update(first_token=subject_is_first_token(lm, case), trained_on=editor.trained_on(lm, case), error=None)

    def failed(error: str, cause: Exception) -> dict:
        if raise_failures:
            raise FailedEdit(error) from cause
        return dict(row, error=error)

    t0 = time.perf_counter()
    try:
        result, reference = apply_case(lm, lambda request: editor.apply(lm, request), case)
    except ValueError as e:  # EditError included: the case or the edit is refused, as a rerun would refuse it
        return dict(row, error=f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - a sweep goes on after any failure
        return failed(f"{type(e).__name__}: {e}", e)
    try:
        row.update(metrics.edit_metrics(lm, case, reference))
        if result.test_prefix is not None:
            pre = metrics.edit_metrics(lm, case, reference, prefix=result.test_prefix)
            row.update({f"prefixed_{k}": v for k, v in pre.items()})
        ppl = perplexity.me_ppl(lm, ppl_size, progress=False)
    except Exception as e:  # noqa: BLE001
        return failed(f"{type(e).__name__} while measuring the edited model: {e}", e)
    finally:
        result.undo()
    row.update(ppl=ppl["mean"], ppl_median=ppl["median"], ppl_size=ppl_size,
               collapsed=bool(is_collapsed(ppl["mean"], threshold)),
               **result.scalars(), test_prefix=result.test_prefix,
               seconds_edit=result.seconds["total"], seconds_total=time.perf_counter() - t0)
    if ppl_original is not None:
        row["ppl_ratio"] = ppl["mean"] / ppl_original
    return row


def single_edit_sweep(lm: LoadedModel, editor_name: str, cases: list[dict], store: ResultStore,
                      experiment: str = "single_edit", ppl_size: int = 50, ppl_original: float | None = None,
                      editor_kwargs: dict | None = None, retry_errors: bool = False) -> dict:
    """`single_edit_row` for every case not yet in `store` (tqdm bar with ETA); returns a summary, also printed
    unless every case was in the store already.

    A refused edit is stored as a row with `error` set; a rerun keeps it, unless `retry_errors`: then the case
    is edited again and its new row supersedes the error row. A `FailedEdit` is not stored: the sweep goes on,
    and a rerun retries it. Summary: cases, done_before, stored (rows written now), retried (error rows edited
    again), error_rows (these cases' rows with `error` set in the store now), failed (not stored) and failures
    (case_id and error of each).
    """
    editor = get_editor(editor_name, **(editor_kwargs or {}))
    ids = dict(experiment=experiment, model=lm.spec.name, editor=editor.name)
    label, failures = f"{editor.name} on {lm.spec.name}", []

    def one(case: dict) -> dict | None:
        try:
            return dict(ids, **single_edit_row(lm, editor, case, ppl_size, ppl_original, raise_failures=True))
        except FailedEdit as e:
            failures.append(dict(case_id=case.get("case_id"), error=str(e)))
            return None  # not stored: the next sweep edits it again

    def key_of(case: dict) -> tuple:
        return experiment, lm.spec.name, editor.name, case.get("dataset"), case.get("case_id")

    keys = {store.normalize_key(key_of(c)) for c in cases}
    with store.writing():
        before = store.done()
        pending = keys - (store.done(include_errors=False) if retry_errors else before)
        stored = run_cases(store, cases, one, key_of, desc=label, retry_errors=retry_errors)
        errors = len(keys & (store.done() - store.done(include_errors=False)))
    summary = dict(cases=len(cases), done_before=len(cases) - len(pending), stored=stored,
                   retried=len(pending & before), error_rows=errors, failed=len(failures), failures=failures)
    if not pending:  # everything was in the store: nothing to report (a rerun of a notebook stays quiet)
        return summary
    first = "; ".join(f"case {f['case_id']}: {f['error'][:120]}" for f in failures[:3])
    again = f"{summary['retried']} of them edited again" if retry_errors else "retry_errors=True edits them again"
    tqdm.write(f"{label}: {len(cases)} cases, {summary['done_before']} done before, {stored} stored now; {errors} "
               f"error rows (refused edits; {again}); {len(failures)} failed and not stored (a rerun retries them)"
               + (f": {first}" if first else ""))
    return summary


def results_store(results_dir: str | Path, name: str) -> ResultStore:
    """The store `<results_dir>/<name>.jsonl` (relative paths start at the repository root)."""
    return ResultStore(in_repo(results_dir) / f"{name}.jsonl", key=ROW_KEY)


def downstream_rows(lm: LoadedModel, editor_name: str | None, case: dict | None, n: int | None,
                    seed: int = 0, tasks=None) -> list[dict]:
    """Downstream scores of the original model (`case` None) or of the model edited on `case`.

    Rows (task, metric, value, n, case_id, status); the edit is undone afterwards.
    """
    from ..eval import downstream
    from ..editors import edited

    tasks = tasks or downstream.TASKS
    if case is None:
        table = downstream.evaluate_all(lm, tasks=tasks, n=n, seed=seed)
        return [dict(r, case_id=-1, status="original") for r in table.to_dict("records")]
    editor = get_editor(editor_name)
    with edited(lm, EditRequest.from_case(case), editor):
        table = downstream.evaluate_all(lm, tasks=tasks, n=n, seed=seed)
    return [dict(r, case_id=case["case_id"], status="edited") for r in table.to_dict("records")]


def shipped_hardcf(model: str) -> list[dict] | None:
    """This model's HardCF shipped in `data/hardcf/<model>.json` (the guard's screen of all of CounterFact,
    confirmed by real edits: data/hardcf/SOURCE.md), or None where none ships."""
    path = data_dir() / "hardcf" / f"{model}.json"
    if not path.exists():
        return None
    cases = json.loads(path.read_text())
    return [dict(c, dataset=c.get("dataset", "counterfact")) for c in cases]


def edit_samples(lm: LoadedModel, n_counterfact: int | None, n_zsre: int | None = 0, n_first_token: int = 0,
                 n_hardcf: int | None = 0, seed: int = 0) -> dict[str, list[dict]]:
    """Notebook 02's samples by name, each nested in its size (same seed, same cases as notebooks 01, 03, 04):
    "random" (`n_counterfact` random CounterFact cases; None: all), "first-token" (`n_first_token` cases whose
    subject is the prompt's first token; fewer where fewer exist), "hardcf" (the first `n_hardcf` by case_id of
    this model's shipped HardCF, `shipped_hardcf`; None: all of it, none where none ships) and "zsre"
    (`n_zsre`; None: all). Empty samples are left out."""
    samples = {"random": data.load_cases("counterfact", n_counterfact, seed) if n_counterfact != 0 else [],
               "first-token": (first_token_cases(lm, data.load_cases("counterfact"), n_first_token, seed)
                               if n_first_token else [])}
    hardcf = shipped_hardcf(lm.spec.name) if n_hardcf != 0 else None
    by_id = {c["case_id"]: c for c in data.load_counterfact()} if hardcf else {}
    ids = sorted(int(c["case_id"]) for c in hardcf or [])
    samples["hardcf"] = [by_id[i] for i in (ids if n_hardcf is None else ids[:n_hardcf])]
    samples["zsre"] = data.load_cases("zsre", n_zsre, seed) if n_zsre != 0 else []
    return {name: sorted(cases, key=lambda c: c["case_id"]) for name, cases in samples.items() if cases}


def counterfact_cases(lm: LoadedModel, n_random: int | None, n_first_token: int = 0, n_hardcf: int | None = 0,
                      seed: int = 0) -> list[dict]:
    """The CounterFact cases of `edit_samples`' random, first-token and HardCF samples, once each, by case_id
    (notebooks 01 and 04: the HardCF gives the collapse side its size without a screen)."""
    samples = edit_samples(lm, n_random, 0, n_first_token, n_hardcf, seed)
    cases = {c["case_id"]: c for name in ("random", "first-token", "hardcf") for c in samples.get(name, [])}
    return sorted(cases.values(), key=lambda c: c["case_id"])


def _by_dataset(samples: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The union of the samples' cases per dataset, without duplicates, by case_id."""
    out: dict[str, dict] = {}
    for cases in samples.values():
        for c in cases:
            out.setdefault(c.get("dataset", "counterfact"), {})[c["case_id"]] = c
    return {d: sorted(cs.values(), key=lambda c: c["case_id"]) for d, cs in out.items()}


def sweep_samples(lm: LoadedModel, editors, samples: dict[str, list[dict]], store: ResultStore, ppl_size: int = 50,
                  ppl_original: float | None = None, experiment: str | None = None) -> dict[tuple[str, str], dict]:
    """`single_edit_sweep` of every editor over the union of `samples` per dataset (a case in two samples is
    edited once; rows in `store` are reused). Returns {(editor, dataset): the sweep's summary}."""
    experiment = experiment or f"single_edit_ppl{ppl_size}"
    return {(editor, dataset): single_edit_sweep(lm, editor, cases, store, experiment=experiment, ppl_size=ppl_size,
                                                 ppl_original=ppl_original)
            for editor in editors for dataset, cases in _by_dataset(samples).items()}


def sample_rows(store, model: str, editors, samples: dict[str, list[dict]], ppl_size: int = 50,
                experiment: str | None = None):
    """The rows of `editors` on `model` for each sample, with column `sample` (a case in two samples has a
    row in each), in the samples' order."""
    import pandas as pd

    from ..results.tables import sweep_rows

    experiment = experiment or f"single_edit_ppl{ppl_size}"
    rows = store.read() if isinstance(store, ResultStore) else store
    parts = [sweep_rows(rows, experiment, model, editors, _by_dataset({name: cases})).assign(sample=name)
             for name, cases in samples.items()]
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["sample", *ROW_KEY])


def bos_contrast(models: list[LoadedModel], editors, n_random: int, n_first_token: int, store: ResultStore,
                 ppl_size: int = 50, seed: int = 0):
    """The papers' contrast ("The Fall of ROME", Sec. 3: first-token collapse needs a model without BOS):
    on each model, `editors` edit `n_random` random and `n_first_token` first-token CounterFact cases (the
    samples of `edit_samples`, so rows of notebook 02's own sweep are reused). Returns (rows with `model`
    and `sample`, {model: prepend_bos}); feed them to `results.tables.bos_contrast_table`."""
    import pandas as pd

    parts, bos = [], {}
    for lm in models:
        samples = edit_samples(lm, n_random, 0, n_first_token, 0, seed)
        original = perplexity.me_ppl(lm, ppl_size, progress=False)["mean"]
        sweep_samples(lm, editors, samples, store, ppl_size, ppl_original=original)
        parts.append(sample_rows(store, lm.spec.name, editors, samples, ppl_size))
        bos[lm.spec.name] = bool(lm.spec.prepend_bos)
    return pd.concat(parts, ignore_index=True), bos


def hard_and_normal_cases(lm: LoadedModel, store: ResultStore, n: int, n_screen: int = 0, ppl_size: int = 50,
                          seed: int = 0) -> tuple[list[dict], list[dict]]:
    """This model's hard cases (HardCF: CounterFact cases that one ROME edit collapses) and as many normal ones.

    Hard cases come from the shipped HardCF (`shipped_hardcf`) where there is one; otherwise from the
    single-edit rows of `store` (experiment `single_edit_ppl<ppl_size>`), after editing `n_screen`
    first-token cases with ROME (rows reused when present), since they are where ROME collapses.
    At most `n` hard cases are returned, by case_id; the normal cases are a seeded random sample of
    the same size among cases whose subject is not the first token and that are not hard (the
    paper's "equal amount of normal samples").
    """
    cf = data.load_counterfact()
    by_id = {c["case_id"]: c for c in cf}
    shipped = shipped_hardcf(lm.spec.name)
    if shipped is not None:
        hard_ids = sorted(int(c["case_id"]) for c in shipped)[:n]
    else:
        experiment = f"single_edit_ppl{ppl_size}"
        if n_screen:
            single_edit_sweep(lm, "rome", first_token_cases(lm, cf, n_screen, seed), store, experiment=experiment,
                              ppl_size=ppl_size)
        hit = select(store, ok=True, experiment=experiment, model=lm.spec.name, editor="rome", dataset="counterfact",
                     collapsed=True)
        hard_ids = sorted(int(i) for i in hit.case_id)[:n]
    hard = [by_id[i] for i in hard_ids]
    hard_set = set(hard_ids)
    pool = [c for c in data.load_counterfact(n=20 * max(1, len(hard)), seed=seed)
            if c["case_id"] not in hard_set and not subject_is_first_token(lm, c)]
    return hard, sorted(pool[:len(hard)], key=lambda c: c["case_id"])
