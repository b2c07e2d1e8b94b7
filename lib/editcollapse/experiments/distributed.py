"""Sweeps on Ray: one worker per GPU or per CPU slot, each loading its model once and editing chunks of cases.

    from editcollapse.experiments.distributed import SingleEdit, ray_sweep
    ray_sweep(SingleEdit("rome"), "smollm2-135m", cases, store, workers=2)

- **Work.** A job (`SingleEdit`, `SequentialRuns`, `GuardScreen`) turns items (cases, or whole edit
  sequences) into rows of a `ResultStore`. Items whose rows are stored already are skipped, so a
  sweep that is run again does only what is missing.
- **Workers.** Ray actors, each holding its own copy of the model, its torch threads pinned to its
  share of the cores (`threads`; Ray reserves that many CPUs per worker, or one GPU with
  `gpus_per_worker=1`). Small chunks of items are handed to whichever worker is free
  (`ActorPool.map_unordered`), so workers stay busy when cases differ in cost.
- **Results.** Workers return rows; only the driver writes, under the store's writer lock, and only
  rows whose key is new. Nothing is duplicated, and the same code works on a cluster whose nodes share
  no disk with the driver.
- **Failures.** A worker that dies is restarted by Ray and its chunk retried (`max_restarts`,
  `max_task_retries`); rows the driver stored before are kept. A driver that dies loses at most the
  chunks in flight: running the sweep again does the rest.
- **Where.** With no Ray running, `ray_sweep` starts a local instance (all the machine's cores);
  `address="auto"` or `"ray://host:10001"` joins an existing cluster. Runs on one process (no
  Ray) stay `experiments.single.single_edit_sweep` and friends: the rows are the same.

`python -m editcollapse.cli.sweep --help` runs a single-edit sweep from the command line.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..editors import get_editor
from ..guard import key_features, key_site
from ..models.loading import load_model
from ..results.store import SEQ_KEY, ResultStore
from .sequential import sequential_run
from .single import FailedEdit, single_edit_row


# ---------------------------------------------------------------- jobs
# A job: keys(model, item) -> the store keys of an item's rows; setup(lm) once per worker;
# rows(lm, items) -> the rows of a chunk of items; `chunk`: items per chunk.
@dataclass
class SingleEdit:
    """`experiments.single_edit_row` per case: edit the unedited model, measure, undo (rows keyed ROW_KEY)."""

    editor: str
    experiment: str = "single_edit_ppl50"
    ppl_size: int = 50
    ppl_original: float | None = None
    editor_kwargs: dict = field(default_factory=dict)
    chunk: int = 2

    def __post_init__(self):
        self.name = get_editor(self.editor, **self.editor_kwargs).name  # refuses unknown editors here

    def keys(self, model: str, item: dict) -> list[tuple]:
        return [(self.experiment, model, self.name, item.get("dataset"), item.get("case_id"))]

    def setup(self, lm) -> None:
        self._editor = get_editor(self.editor, **self.editor_kwargs)

    def rows(self, lm, items: list[dict]) -> list[dict]:
        """A row per case; none for a case whose edit failed for another reason than the case itself
        (experiments.FailedEdit), so that the next sweep retries it."""

        ids, out = dict(experiment=self.experiment, model=lm.spec.name, editor=self.name), []
        for case in items:
            try:
                out.append(dict(ids, **single_edit_row(lm, self._editor, case, self.ppl_size, self.ppl_original,
                                                       raise_failures=True)))
            except FailedEdit:
                pass
        return out


@dataclass
class SequentialRuns:
    """One item is a whole sequence {"editor", "run", "cases"}: `sequential.sequential_run`, a row per step.

    The unit of work is the run: a run cut short by a dead worker is redone from its start (within one
    process, `sequential_run` itself resumes from the last step)."""

    experiment: str = "sequential"
    ppl_size: int = 50
    chunk: int = 1

    def keys(self, model: str, item: dict) -> list[tuple]:
        name = get_editor(item["editor"]).name
        return [(self.experiment, item["run"], model, name, step) for step in range(len(item["cases"]) + 1)]

    def setup(self, lm) -> None:
        pass

    def rows(self, lm, items: list[dict]) -> list[dict]:
        out = []
        for item in items:
            with tempfile.TemporaryDirectory() as tmp:
                store = ResultStore(Path(tmp) / "run.jsonl", key=SEQ_KEY)
                sequential_run(lm, item["editor"], item["cases"], store, run=item["run"], experiment=self.experiment,
                               ppl_size=self.ppl_size, state_dir=Path(tmp) / "state")
                out += [json.loads(line) for line in store.path.read_text().splitlines() if line.strip()]
        return out


@dataclass
class GuardScreen:
    """The collapse guard's keys-only features of each case (`hardcases.hardcf.screen`'s rows: no edit, no perplexity)."""

    editor: str = "rome"
    experiment: str = "guard_screen"
    n_contexts: int | None = None
    chunk: int = 64

    def keys(self, model: str, item: dict) -> list[tuple]:
        return [(self.experiment, model, self.editor, item.get("dataset"), item.get("case_id"))]

    def setup(self, lm) -> None:
        self._site = key_site(lm, get_editor(self.editor)).subset(self.n_contexts)

    def rows(self, lm, items: list[dict]) -> list[dict]:
        ids = dict(experiment=self.experiment, model=lm.spec.name, editor=self.editor,
                   n_contexts=len(self._site.contexts) - 1)
        feats = key_features(lm, items, site=self._site, batch_size=len(items))
        return [dict(ids, dataset=case.get("dataset"), **row) for case, row in zip(items, feats.to_dict("records"))]


# ---------------------------------------------------------------- workers
def _worker_class():
    import ray

    @ray.remote(max_restarts=-1, max_task_retries=-1)
    class Worker:
        """Loads the model once; `run(chunk)` returns the rows of every item of the chunk."""

        def __init__(self, model: str, device: str | None, threads: int, job):
            torch.set_num_threads(threads)
            os.environ["OMP_NUM_THREADS"] = str(threads)
            self.lm = load_model(model, device=device)
            self.job = job
            self.job.setup(self.lm)

        def run(self, chunk: list) -> tuple[int, list[dict]]:
            return len(chunk), self.job.rows(self.lm, chunk)

    return Worker


def default_workers(threads: int, gpus_per_worker: float) -> int:
    """Workers that fit the Ray cluster's free resources: one per GPU slot, else one per `threads` CPUs."""
    import ray

    free = ray.available_resources()
    if gpus_per_worker:
        return max(1, int(free.get("GPU", 0) // gpus_per_worker))
    return max(1, int(free.get("CPU", 1) // threads))


def ray_sweep(job, model: str, items: list, store: ResultStore, workers: int | None = None, threads: int = 1,
              gpus_per_worker: float = 0, chunk: int | None = None, device: str | None = None, address: str | None = None,
              progress: bool = True) -> int:
    """Run `job` over `items` on Ray workers into `store`; returns the rows written by this call.

    `threads` torch threads (and Ray CPUs) per worker; `workers` defaults to what fits the free
    resources; `chunk` items per task (default: the job's). Items whose rows are all stored are
    skipped; rows are written by this process only.
    """
    import ray
    from ray.util import ActorPool

    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    chunk = job.chunk if chunk is None else chunk
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    done, pending, seen = store.done(), [], set()
    for item in items:
        keys = [store.normalize_key(k) for k in job.keys(model, item)]
        if seen.intersection(keys):
            raise ValueError(f"two items share the key {dict(zip(store.key, seen.intersection(keys).pop()))}")
        seen.update(keys)
        if not set(keys) <= done:
            pending.append(item)
    if not pending:
        return 0
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    n = workers or default_workers(threads, gpus_per_worker)
    n = min(n, len(pending))
    Worker = _worker_class()
    actors = [Worker.options(num_cpus=threads, num_gpus=gpus_per_worker).remote(model, device, threads, job)
              for _ in range(n)]
    chunks = [pending[i:i + chunk] for i in range(0, len(pending), chunk)]
    written = 0
    try:
        with store.writing(), tqdm(total=len(pending), desc=f"{type(job).__name__} on {model}, {n} Ray workers",
                                   disable=not progress) as bar:
            for n_items, rows in ActorPool(actors).map_unordered(lambda actor, c: actor.run.remote(c), chunks):
                for row in rows:
                    if store.normalize_key([row[k] for k in store.key]) not in store.done():
                        store.append(row)
                        written += 1
                bar.update(n_items)
    finally:
        for actor in actors:
            ray.kill(actor)
    return written
