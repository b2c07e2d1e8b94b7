"""HardEdit (Butterfly Effect paper, Sec. 5): edits made to collapse a model, generated from HardCF's pattern.

The paper's three steps, here for any local model:

1. `pattern.pattern`: the features the collapse cases (HardCF) share;
2. `generate`: candidates from the offline recombinations (`generate.OfflineGenerator`), a local instruction
   model (`generate.LocalGenerator`) and an OpenAI-compatible server (`endpoint.EndpointGenerator`), then
   `validate.validate`, which drops whatever fails with its reason;
3. `filter_candidates`: one ROME edit per candidate (ranked by the guard's score first), ME-PPL perplexity,
   kept when `labels.is_collapsed`; rows go to a ResultStore (resumable).

`write_hardedit` saves the kept cases in CounterFact format with their perplexity, generator, generation
prompt, settings and model. Command line: ``python -m editcollapse.cli.hardedit --help``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .. import data
from ..experiments.single import results_store, single_edit_sweep, subject_is_first_token
from ..guard import key_features
from ..models.loading import LoadedModel
from ..paths import in_repo
from ..results.labels import is_collapsed
from ..results.query import select
from ..results.store import ResultStore
from .endpoint import EndpointGenerator
from .generate import Generation, LocalGenerator, OfflineGenerator
from .hardcf import write_hard_cases
from .pattern import FIELDS, single_token_subjects
from .validate import CF_FIELDS


def generate(lm: LoadedModel, hard: pd.DataFrame, first_token: bool, max_subject_tokens: int = 1,
             offline_calls: int = 20, local_calls: int = 0, endpoint_calls: int = 0, timeout: float = 120.0,
             seed: int = 0, store: ResultStore | None = None, counterfact: list[dict] | None = None
             ) -> list[Generation]:
    """Step 2's generations: `offline_calls` offline recombinations, then `local_calls` answers of the local model
    and `endpoint_calls` of HARDEDIT_ENDPOINT to the paper's prompt (CounterFact's single-token subjects, the
    HardCF cases `hard` as examples); chat answers go to `store` as they arrive (see `PromptGenerator.generate`)."""
    counterfact = data.load_counterfact() if counterfact is None else counterfact
    chat = dict(subjects=single_token_subjects(lm, counterfact), examples=hard[list(FIELDS)].to_dict("records"),
                seed=seed)
    endpoint = EndpointGenerator.from_env(**chat, timeout=timeout) if endpoint_calls else None
    out = OfflineGenerator(lm, seed=seed, first_token=first_token, max_subject_tokens=max_subject_tokens,
                           counterfact=counterfact).generate(offline_calls)
    if local_calls:
        out += LocalGenerator(lm, **chat).generate(local_calls, store)
    if endpoint is not None:
        out += endpoint.generate(endpoint_calls, store)
    return out


def rank(lm: LoadedModel, candidates: list[dict]) -> list[dict]:
    """Candidates by the guard's collapse score, highest first (requests it cannot read go last)."""
    feats = key_features(lm, candidates) if candidates else pd.DataFrame(columns=["case_id", "score"])
    score = dict(zip(feats.case_id, feats.score.fillna(float("-inf"))))
    return sorted(candidates, key=lambda c: -score.get(c["case_id"], float("-inf")))


def filter_candidates(lm: LoadedModel, candidates: list[dict], results_dir: str | Path = "results",
                      ppl_size: int = 50, limit: int | None = None, use_guard: bool = True,
                      store_name: str = "hardedit") -> pd.DataFrame:
    """ROME on each candidate (guard-ranked first, the first `limit`), ME-PPL_{ppl_size} after it, into
    `<results_dir>/<store_name>.jsonl` (rows done before are reused). Returns the rows of every candidate
    measured (now or before), with `kept` = labels.is_collapsed, `guard_rank` and `ranker` ("guard" or "none")."""
    ordered = rank(lm, candidates) if use_guard else list(candidates)
    store = results_store(results_dir, store_name)
    experiment = f"hardedit_ppl{ppl_size}"
    single_edit_sweep(lm, "rome", ordered[:limit], store, experiment=experiment, ppl_size=ppl_size)
    rows = select(store, experiment=experiment, model=lm.spec.name, editor="rome")
    missing = [c for c in ("error", "ppl", "denominator") if c not in rows]  # an empty store has key columns only
    rows = rows.reindex(columns=[*rows.columns, *missing])
    order = {c["case_id"]: i for i, c in enumerate(ordered)}
    rows = rows[rows.case_id.isin(order)].assign(guard_rank=lambda r: r.case_id.map(order),
                                                 ranker="guard" if use_guard else "none")
    kept = rows.error.isna() & is_collapsed(rows.ppl.fillna(1.0).astype(float))
    return rows.assign(kept=kept).sort_values("guard_rank").reset_index(drop=True)


def filter_yield(rows: pd.DataFrame, candidates: list[dict]) -> pd.DataFrame:
    """Per generator: candidates edited, collapsed (kept), their median perplexity and denominator, and the yield."""
    by = rows.assign(generator=rows.case_id.map({c["case_id"]: c["generator"] for c in candidates}))
    out = by.groupby("generator").agg(edited=("kept", "size"), collapsed=("kept", "sum"),
                                      median_ppl=("ppl", "median"), median_denominator=("denominator", "median"))
    return out.assign(**{"yield": out.collapsed / out.edited})


def write_hardedit(path, rows: pd.DataFrame, candidates: list[dict], meta: dict) -> list[dict]:
    """The kept cases in CounterFact format (+ ppl, generator, generation prompt, settings, model), JSON at `path`."""
    by_id = {c["case_id"]: c for c in candidates}

    def record(r) -> dict:
        c = by_id[int(r.case_id)]
        return dict({f: c[f] for f in CF_FIELDS}, ppl=float(r.ppl), ppl_size=int(r.ppl_size),
                    denominator=float(r.denominator), first_token=bool(r.first_token), model=meta["model"],
                    editor="rome", generator=c["generator"], generation_prompt=c["generation_prompt"],
                    settings=dict(meta.get("settings", {}), generation=c["generation_settings"]),
                    rephrase_is_prompt=c["rephrase_is_prompt"])

    return write_hard_cases(path, rows[rows.kept], record)


def load_hardedit(path) -> list[dict]:
    """A HardEdit JSON file as edit cases (dataset 'counterfact', as `metrics` and the editors expect)."""
    return [dict(c, dataset="counterfact") for c in json.loads(in_repo(path).read_text())]


def normal_cases(lm: LoadedModel, n: int, seed: int = 0, exclude=()) -> list[dict]:
    """`n` CounterFact cases whose subject is not the prompt's first token (seeded; `exclude`: case ids)."""
    exclude = set(exclude)
    pool = [c for c in data.load_counterfact(n=20 * max(n, 1), seed=seed)
            if c["case_id"] not in exclude and not subject_is_first_token(lm, c)]
    return sorted(pool[:n], key=lambda c: c["case_id"])
