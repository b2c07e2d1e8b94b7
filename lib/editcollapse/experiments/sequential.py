"""Sequential editing (Butterfly Effect, Sec. 4.2): N edits in a row on one model, measured after each.

`sequential_run` applies the cases' edits one after another with one editor, through an
`EditStack`, and after every step appends a row: the edit's own metrics and diagnostics, ME-PPL
perplexity of the model as edited so far, and the cumulative parameter change of every tensor
touched so far against the unedited model (‖W_t − W_0‖, ‖W_t − W_0‖/‖W_0‖, the norm growth
‖W_t‖/‖W_0‖ and the condition number σ_max/σ_min of W_t, the indicators that PRUNE and NAS
follow). Step 0 is the unedited model. Optional downstream scores are taken at chosen steps.
`sequential_runs` runs every editor on every case sequence (the paper's hard and normal cases).

A killed run resumes from its last completed edit, and goes on as the run that was killed would
have: rows equal (timings aside) and weights bit-identical. After each edit its row's own
measurements (edit metrics, diagnostics) are taken; then the current values of the touched
tensors, their unedited values, that pending row and the state that the editor's later edits read
from its live edits (`Editor.carries`: AlphaEdit's preserved keys) are saved atomically in one
safetensors file; then the step's perplexity and row are written. On restart the saved weights are
put back as one undoable edit carrying that state, a pending row is completed and written, and the
run goes on. What an edit reads from the model itself (context templates, C) is computed on the
unedited model (`live.unedited`), so a resumed process gets the same. No step is measured twice
and none is lost. When the run ends (or fails), the stack is undone: the model is bit-identical to
what it was before.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..eval import metrics, perplexity
from ..editors import EditError, EditStack, get_editor
from ..editors.base import apply_state
from .single import apply_case
from ..models.loading import LoadedModel
from ..models.nethook import get_parameter
from ..paths import in_repo
from ..results.labels import COLLAPSE_THRESHOLD, is_collapsed
from ..results.store import SEQ_KEY, ResultStore
from ..results.tables import sequential_rows


def param_change(w0: torch.Tensor, wt: torch.Tensor, cond_0: float | None = None) -> dict:
    """Cumulative change of one weight matrix: delta_norm, rel_change, norm_growth, cond (and cond_0)."""
    w0, wt = w0.double(), wt.double()
    d = (wt - w0).norm().item()
    n0 = w0.norm().item()
    return dict(delta_norm=d, rel_change=d / n0, norm_growth=wt.norm().item() / n0,
                cond=torch.linalg.cond(wt).item(), cond_0=cond_0 if cond_0 is not None else torch.linalg.cond(w0).item())


class RunState:
    """A sequential run after its last completed step, in one file (atomic replace): the touched
    tensors' current and unedited values, the step's pending row and the editor's carried state."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint

    def load(self) -> dict | None:
        """{step, current, original, row, carried}, or None before the first step."""
        if not self.path.exists():
            return None
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(self.path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"the run state {self.path} cannot be read ({e}); delete it and the run's rows "
                             "to start this run afresh") from e
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{self.path} belongs to another run (other cases, editor, settings or model); "
                             "delete it to start this run afresh")
        part = {p: {k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + "/")}
                for p in ("current", "original", "carried")}
        carried = {name: {key: part["carried"][f"{name}/{i}"] for i, key in enumerate(keys)}
                   for name, keys in json.loads(meta["carried"]).items()}
        return dict(step=int(meta["step"]), current=part["current"], original=part["original"],
                    row=json.loads(meta["row"]), carried=carried)

    def save(self, step: int, current: dict, original: dict, row: dict, carried: dict) -> None:
        """`carried`: {diagnostic: {key: tensor}}, keys of any JSON type (AlphaEdit: layer numbers)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        tensors = {f"current/{k}": v.detach().cpu().contiguous() for k, v in current.items()}
        tensors.update({f"original/{k}": v.detach().cpu().contiguous() for k, v in original.items()})
        tensors.update({f"carried/{name}/{i}": v.detach().cpu().contiguous()
                        for name, d in carried.items() for i, v in enumerate(d.values())})
        save_file(tensors, tmp, metadata=dict(step=str(step), fingerprint=self.fingerprint, row=json.dumps(row),
                                              carried=json.dumps({n: list(d) for n, d in carried.items()})))
        os.replace(tmp, self.path)


def carried_state(editor, results) -> dict:
    """The diagnostics named by `editor.carries` of the given live edits, each key's tensors concatenated
    oldest first: what a later edit reads from all of them (AlphaEdit's K_p)."""
    out = {}
    for name in editor.carries:
        parts: dict = {}
        for r in results:
            for key, value in r.diagnostics.get(name, {}).items():
                parts.setdefault(key, []).append(value)
        out[name] = {key: torch.cat(values) for key, values in parts.items()}
    return out


def _fingerprint(lm: LoadedModel, editor, cases: list[dict], run: str) -> str:
    """The run's identity: model, editor, its resolved settings (preset + overrides), run name, cases."""
    ids = [(c.get("dataset"), c.get("case_id")) for c in cases]
    settings = asdict(editor.hparams_for(lm)) if hasattr(editor, "hparams_for") else None
    return hashlib.sha256(json.dumps([lm.spec.name, editor.name, run, settings, ids],
                                     default=str).encode()).hexdigest()[:16]


def sequential_run(lm: LoadedModel, editor, cases: list[dict], store: ResultStore, run: str,
                   experiment: str = "sequential", ppl_size: int = 50, state_dir: str | Path = "results/state",
                   downstream_steps=(), downstream_store: ResultStore | None = None, downstream_kwargs=None,
                   threshold: float = COLLAPSE_THRESHOLD, editor_kwargs: dict | None = None,
                   checkpoint_steps=(), checkpoint_ppl_size: int = 1000,
                   retention_store: ResultStore | None = None) -> int:
    """Edit the model with every case in order (one `editor`, a name or an Editor), one row per step.

    Rows are keyed by SEQ_KEY; `run` names the case sequence (e.g. "hard", "normal"). Downstream
    scores (`downstream.evaluate_all(lm, **downstream_kwargs)`) go to `downstream_store` at the
    steps listed in `downstream_steps`. At `checkpoint_steps` the row also holds the perplexity on the
    larger ME-PPL subset `checkpoint_ppl_size` (columns ppl_<size>, ppl_<size>_median; the paper's
    sequential setting is ME-PPL_1k at every step). With `retention_store` (keyed by RETENTION_KEY), the
    last step also scores every case of the run again under the final weights (`metrics.edit_metrics`,
    one row per case, `edited_at` its step): whether the earlier edits still hold at the end. A run whose rows are all stored is complete: it
    returns at once, without its state file (so runs shipped as rows alone are reused). Returns the
    number of rows written by this call.
    """
    for what, name in (("run", run), ("experiment", experiment)):
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"{what} must be a plain name (letters, digits, '_', '.', '-'; it names the run's state "
                             f"file), not {name!r}")
    editor = get_editor(editor, **(editor_kwargs or {})) if isinstance(editor, str) else editor
    with ExitStack() as locks:
        for s in (store, downstream_store, retention_store):
            if s is not None:
                locks.enter_context(s.writing())
        return _run(lm, editor, cases, store, run, experiment, ppl_size, state_dir, downstream_steps,
                    downstream_store, downstream_kwargs, threshold, dict.fromkeys(checkpoint_steps, checkpoint_ppl_size),
                    retention_store)


def sequential_runs(lm: LoadedModel, editors, runs: dict[str, list[dict]], store: ResultStore,
                    experiment: str = "sequential", ppl_size: int = 50, state_dir: str | Path = "results/state",
                    downstream_store: ResultStore | None = None, downstream_kwargs=None,
                    downstream_at_start: bool = False, checkpoint_ppl_size: int | None = None,
                    n_checkpoints: int = 5, retention_store: ResultStore | None = None) -> pd.DataFrame:
    """The paper's sequential setting (Sec. 4.2): every editor (a name or an Editor) on every run ({name: cases},
    each from the unedited model; an empty run is skipped), through `sequential_run`. Downstream scores go to
    `downstream_store` (where given) at each run's last step, and at step 0 too with `downstream_at_start`;
    with `checkpoint_ppl_size`, ME-PPL_<checkpoint_ppl_size> is measured at `n_checkpoints` evenly spaced
    steps, the first and the last included; with `retention_store`, every case is scored again at the end. Returns these runs' steps on ME-PPL_<ppl_size> (`sequential_rows`)."""
    for editor in editors:
        for run, cases in runs.items():
            if not cases:
                continue
            n = len(cases)
            checkpoints = (sorted({round(i * n / (n_checkpoints - 1)) for i in range(n_checkpoints)})
                           if checkpoint_ppl_size else ())
            sequential_run(lm, editor, cases, store, run=run, experiment=experiment, ppl_size=ppl_size,
                           state_dir=state_dir, downstream_store=downstream_store, downstream_kwargs=downstream_kwargs,
                           downstream_steps=(0, n) if downstream_at_start else (n,), checkpoint_steps=checkpoints,
                           checkpoint_ppl_size=checkpoint_ppl_size or 1000, retention_store=retention_store)
    names = [e if isinstance(e, str) else e.name for e in editors]
    return sequential_rows(store, lm.spec.name, names, list(runs), experiment, ppl_size=ppl_size)


def _run(lm, editor, cases, store, run, experiment, ppl_size, state_dir, downstream_steps, downstream_store,
         downstream_kwargs, threshold, checkpoints: dict[int, int], retention_store=None) -> int:
    """sequential_run's body, with the writers' locks held (released when the run ends or fails)."""
    ids = dict(experiment=experiment, run=run, model=lm.spec.name, editor=editor.name)
    done = {k[-1] for k in store.done() if k[:4] == tuple(ids.values())}
    if done >= set(range(len(cases) + 1)):
        return 0
    state = RunState(in_repo(state_dir) / lm.spec.name / editor.name / f"{experiment}_{run}.safetensors",
                     _fingerprint(lm, editor, cases, run))
    saved = state.load()
    start = saved["step"] if saved else 0
    missing = sorted(set(range(start)) - done - {0})
    if missing or any(s > start for s in done):
        raise ValueError(f"{store.path} and {state.path} disagree (rows of steps {sorted(done)}, weights at step "
                         f"{start}); delete the run's rows and its state file to start it afresh")
    written = 0
    cond_0: dict[str, float] = {}

    def measure(step: int, case: dict | None, row: dict) -> None:
        """Downstream rows of the step (those not stored yet), then the step's own row."""
        nonlocal written
        if step in downstream_steps and downstream_store is not None:
            from ..eval.downstream import evaluate_all

            have = downstream_store.done()
            for r in evaluate_all(lm, **(downstream_kwargs or {})).to_dict("records"):
                r = dict(ids, step=step, **r)
                if downstream_store.normalize_key([r[k] for k in downstream_store.key]) not in have:
                    downstream_store.append(r)
        if step == len(cases) and retention_store is not None:
            have = retention_store.done()
            for at, c in enumerate(cases, 1):
                r = dict(ids, step=step, edited_at=at, **_case_columns(c))
                if retention_store.normalize_key([r[k] for k in retention_store.key]) not in have:
                    retention_store.append(dict(r, **metrics.edit_metrics(lm, c)))
        ppl = perplexity.me_ppl(lm, ppl_size, progress=False)
        if step in checkpoints:
            size = checkpoints[step]
            big = perplexity.me_ppl(lm, size, progress=False)
            row = dict(row, **{f"ppl_{size}": big["mean"], f"ppl_{size}_median": big["median"]})
        tensors = {n: param_change(original[n].to(lm.device), get_parameter(lm.model, n).detach(),
                                   cond_0.get(n)) for n in original}
        cond_0.update({n: t["cond_0"] for n, t in tensors.items()})
        store.append(dict(ids, step=step, n_steps=len(cases), **_case_columns(case), **row, ppl=ppl["mean"],
                          ppl_median=ppl["median"], ppl_size=ppl_size, collapsed=bool(is_collapsed(ppl["mean"], threshold)),
                          tensors=tensors, **_worst(tensors)))
        written += 1

    original = dict(saved["original"]) if saved else {}
    with EditStack(lm) as stack:
        if 0 not in done:
            measure(0, None, dict(error=None))
        if saved:
            resumed = apply_state(lm, saved["current"], label="resumed state")
            resumed.diagnostics.update(saved["carried"])
            stack.results.append(resumed)
            if start not in done:
                measure(start, cases[start - 1], saved["row"])
        for step in tqdm(range(start + 1, len(cases) + 1), desc=f"{editor.name} {run} on {lm.spec.name}",
                         initial=start, total=len(cases)):
            case = cases[step - 1]
            t0 = time.perf_counter()
            try:
                result, reference = apply_case(lm, lambda request: stack.apply(editor, request), case)
            except EditError as e:
                row = dict(error=f"{type(e).__name__}: {e}")
            else:
                for name, value in result.saved.items():
                    original.setdefault(name, value.detach().cpu().clone())
                row = dict(error=None, **metrics.edit_metrics(lm, case, reference),
                           **{f"edit_{k}": v for k, v in result.scalars().items()},
                           seconds_edit=result.seconds["total"], seconds_step=time.perf_counter() - t0)
            state.save(step, {n: get_parameter(lm.model, n) for n in original}, original, row,
                       carried_state(editor, stack.results))
            measure(step, case, row)
    return written


def _case_columns(case: dict | None) -> dict:
    keys = ("case_id", "dataset", "subject", "prompt", "target_new", "ground_truth")
    return {k: (case or {}).get(k) for k in keys}


def _worst(tensors: dict) -> dict:
    """The largest cumulative change over the touched tensors (flat columns for plots)."""
    if not tensors:
        return dict(cum_rel_change=0.0, norm_growth=1.0, cond_ratio=1.0)
    return dict(cum_rel_change=max(t["rel_change"] for t in tensors.values()),
                norm_growth=max(t["norm_growth"] for t in tensors.values()),
                cond_ratio=max(t["cond"] / t["cond_0"] for t in tensors.values()))


def sequential_store(results_dir: str | Path, name: str = "sequential", key=SEQ_KEY) -> ResultStore:
    """The store `<results_dir>/<name>.jsonl` keyed by `key` (SEQ_KEY; DOWNSTREAM_KEY for downstream rows,
    RETENTION_KEY for the retention rows)."""
    return ResultStore(in_repo(results_dir) / f"{name}.jsonl", key=key)
