"""Downstream tasks that show what a collapsed model has lost (Yang et al., ACL 2024 Findings, Sec. 3):
PIQA, HellaSwag, MMLU (discriminative); LAMBADA, NQ, SQuAD 2.0 (generative), scored by
lm-evaluation-harness itself on the live, possibly edited, model.

- The model: `LiveHFLM` is lm-eval's `HFLM` around the loaded model and tokenizer (the same
  objects, nothing copied), so an edit applied in place is what lm-eval scores. Token ids come
  from `LoadedModel.token_ids`, so the model's BOS rule (`spec.prepend_bos`) applies once, at the front.
- The tasks: the YAML configs in `lmeval_tasks/` are lm-eval's own task configs (prompts, few-shot
  settings, filters, metrics) pointed at the sets shipped in `data/` through `editcollapse.data`;
  their header comments say where they differ from lm-eval's (docs/downstream_lmeval.md).
  PIQA, HellaSwag, MMLU and LAMBADA are zero-shot; NQ is 5-shot; SQuAD 2.0 zero-shot.
- Items: `n` items per task are a seeded sample of the task's documents (`data.sample_indices`:
  the same for every model, nested in n), passed to lm-eval as its `samples`.
- Any other lm-eval task whose data are available offline can be named too, with `include_path`
  for a folder of the user's YAML configs (e.g. ``dataset_path: json`` with local ``data_files``).

Scores lie in [0, 1] (LAMBADA's perplexity aside); `RANDOM_BASELINE` holds the papers' chance levels.
"""
from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .. import data
from ..models.loading import LoadedModel
from ..models.tokens import pad_ids

TASKS = ("piqa", "hellaswag", "mmlu", "lambada", "nq", "squad2")
LMEVAL_TASKS = {"piqa": "piqa_local", "hellaswag": "hellaswag_local", "mmlu": "mmlu_local",
                "lambada": "lambada_openai_local", "nq": "nq_open_local", "squad2": "squadv2_local"}
RANDOM_BASELINE = {"piqa": 0.5, "hellaswag": 0.25, "mmlu": 0.25, "lambada": 0.0, "nq": 0.0, "squad2": 0.0}
HEADLINE = {"piqa": "acc", "hellaswag": "acc_norm", "mmlu": "acc", "lambada": "acc", "nq": "exact_match",
            "squad2": "f1"}  # the metric each task is reported by in the papers' tables
TASK_DIR = Path(__file__).with_name("lmeval_tasks")
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
COLUMNS = ["task", "metric", "value", "n", "items", "lmeval_task", "version"]


def _hflm():
    from lm_eval.models.huggingface import HFLM

    class LiveHFLM(HFLM):
        """lm-eval's HFLM on a LoadedModel's live model and tokenizer, with the model's BOS rule."""

        def __init__(self, lm: LoadedModel, batch_size: int = 16):
            super().__init__(pretrained=lm.model, tokenizer=lm.tok, batch_size=batch_size,
                             max_length=lm.model.config.max_position_embeddings, add_bos_token=lm.spec.prepend_bos)
            self.lm = lm

        @property
        def max_gen_toks(self) -> int:
            """lm-eval's default, 256 new tokens, or half the context window when that is shorter."""
            return min(super().max_gen_toks, self.max_length // 2)

        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm=True)  # evaluate_all shows a bar per task

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(requests, disable_tqdm=True)

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            ids = (self.lm.token_ids(string) if add_special_tokens is not False
                   else self.tokenizer(string, add_special_tokens=False)["input_ids"])
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            rows = [self.tok_encode(s, left_truncate_len=left_truncate_len) for s in strings]
            return pad_ids(rows, self.tokenizer.pad_token_id, left=padding_side == "left")

    return LiveHFLM


def live_model(lm: LoadedModel, batch_size: int = 16):
    """lm-eval's model object for the live `lm` (its model and tokenizer themselves, not copies)."""
    with _quiet():
        return _hflm()(lm, batch_size)


@contextmanager
def _quiet():
    """lm-eval's and datasets' log lines and bars, and any use of the global random generators
    (Python, NumPy, torch), stay out of the caller's output and state."""
    import datasets
    import numpy as np
    import torch

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    bars_on = not datasets.utils.are_progress_bars_disabled()
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars_on:
            datasets.utils.enable_progress_bars()
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


@lru_cache(maxsize=8)
def _task_manager(include_path: tuple[str, ...], include_defaults: bool):
    """lm-eval's index of task configs: ours, the user's, and lm-eval's own when asked."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=[str(TASK_DIR), *include_path], include_defaults=include_defaults)


def load_task(name: str, include_path: str | Path | list | None = None):
    """A fresh lm-eval Task: one of ours (`LMEVAL_TASKS` names or TASKS aliases), one under
    `include_path` (a folder, or a list, of the user's YAML configs), or one of lm-eval's own (its
    index of about 14,000 configs is built, once, only when the name is found nowhere else)."""
    include = tuple(str(p) for p in ([] if include_path is None else
                                     [include_path] if isinstance(include_path, (str, Path)) else include_path))
    name = LMEVAL_TASKS.get(name, name)
    for defaults in (False, True):
        tm = _task_manager(include, defaults)
        if name in tm.all_subtasks:
            with _quiet():
                return tm.load([name])["tasks"][name]
    raise ValueError(f"unknown downstream task {name!r}: not one of {', '.join(TASKS)}, nor an lm-eval task "
                     f"(lm-eval's own, or a YAML config under include_path={list(include)})")


def _check_n(n) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive number of items or None (all), not {n!r}")


def run(model, lm_task, n: int | None = None, seed: int = 0, num_fewshot: int | None = None,
        gen_kwargs: dict | None = None) -> dict:
    """lm-eval's evaluation of one Task on `n` of its documents (`data.sample_indices(len(docs), n, seed)`).

    `model` is a `live_model`. Returns lm-eval's output: "results" (the task's aggregate metrics,
    keyed "metric,filter") and "samples" (per document, in document order: doc_id, the requests'
    arguments, the responses, the per-item metrics). `num_fewshot` and `gen_kwargs` (e.g.
    {"max_gen_toks": 256}) override the task's config; no stderr bootstrap, no global seeds touched.
    """
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    _check_n(n)
    name = lm_task.config.task
    if num_fewshot is not None:
        lm_task.set_config(key="num_fewshot", value=num_fewshot)
    elif lm_task.get_config("num_fewshot") is None:
        lm_task.set_config(key="num_fewshot", value=0)
    if gen_kwargs and lm_task.get_config("output_type") == "generate_until":
        lm_task.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)
    lm_task.set_fewshot_seed(seed=FEWSHOT_SEED)
    with _quiet():
        picked = data.sample_indices(len(lm_task.eval_docs), n, seed)
        out = lm_eval_evaluate(model, {"tasks": {name: lm_task}, "groups": {}}, samples={name: picked},
                               bootstrap_iters=0, log_samples=True)
    return {"results": out["results"][name], "samples": sorted(out["samples"][name], key=lambda r: r["doc_id"])}


def _per_item(samples: list[dict], metric: str, filter_key: str) -> list[float] | None:
    """Per-item values of a metric in document order; None when they are not numbers (e.g. BLEU's pairs)."""
    values = [r[metric] for r in samples if r["filter"] == filter_key]
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _rows(task: str, lm_task, out: dict) -> list[dict]:
    """One row per metric: the aggregate, n, and the per-item scores in document order."""
    keys = [k for k in out["results"] if "," in k and not k.partition(",")[0].endswith("_stderr")]
    filters = {}
    for k in keys:
        filters.setdefault(k.partition(",")[0], []).append(k.partition(",")[2])
    version = (lm_task.config.metadata or {}).get("version")
    rows = []
    for k in keys:
        metric, _, filter_key = k.partition(",")
        items = _per_item(out["samples"], metric, filter_key)
        rows.append(dict(task=task, metric=metric if len(filters[metric]) == 1 else k,
                         value=float(out["results"][k]), n=len({r["doc_id"] for r in out["samples"]}), items=items,
                         lmeval_task=lm_task.config.task, version=version))
    return rows


def evaluate_all(lm: LoadedModel, tasks=TASKS, n: int | dict | None = 200, seed: int = 0, batch_size: int = 16,
                 include_path: str | Path | list | None = None, num_fewshot: int | None = None,
                 gen_kwargs: dict | None = None) -> pd.DataFrame:
    """Tidy table (task, metric, value, n, items, lmeval_task, version) of every task's metrics.

    `tasks`: the names in TASKS, or any lm-eval task name whose data are available offline (with
    `include_path` for the user's own YAML configs); `n` items per task, or a {task: n} dict (a
    seeded sample, the same for every model; None: all); `items` holds the per-item scores in document order (for a
    perplexity: each item's log-likelihood). lm-eval's metric names; a metric computed under
    several filters is named "metric,filter".
    """
    sizes = n if isinstance(n, dict) else dict.fromkeys(tasks, n)
    missing = [t for t in tasks if t not in sizes]
    if missing:
        raise ValueError(f"n gives no number of items for task(s) {missing}")
    for t in tasks:
        _check_n(sizes[t])
    loaded = {t: load_task(t, include_path) for t in tasks}
    model = live_model(lm, batch_size)
    rows = []
    for task, lm_task in (bar := tqdm(loaded.items(), desc="downstream", leave=False)):
        bar.set_postfix(task=task)
        rows += _rows(task, lm_task, run(model, lm_task, sizes[task], seed, num_fewshot, gen_kwargs))
    return pd.DataFrame(rows, columns=COLUMNS)


def evaluate(lm: LoadedModel, task: str, n: int | None = None, seed: int = 0, batch_size: int = 16,
             include_path: str | Path | list | None = None, num_fewshot: int | None = None,
             gen_kwargs: dict | None = None) -> dict:
    """Metrics of one task on `n` items (a seeded sample, the same for every model; all when None),
    as {metric: value, ..., "n": n}."""
    table = evaluate_all(lm, [task], n, seed, batch_size, include_path, num_fewshot, gen_kwargs)
    return dict(zip(table.metric, table.value)) | {"n": int(table.n.iloc[0])}
