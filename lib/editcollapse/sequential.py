"""Sequential editing (Butterfly Effect, Sec. 4.2): N edits in a row on one model, measured after each.

`sequential_run` applies the cases' edits one after another with one editor, through an
`EditStack`, and after every step appends a row: the edit's own metrics and diagnostics, ME-PPL
perplexity of the model as edited so far, and the cumulative parameter change of every tensor
touched so far against the unedited model (‖W_t − W_0‖, ‖W_t − W_0‖/‖W_0‖, the norm growth
‖W_t‖/‖W_0‖ and the condition number σ_max/σ_min of W_t, the indicators that PRUNE and NAS
follow). Step 0 is the unedited model. Optional downstream scores are taken at chosen steps.

A killed run resumes from its last completed edit. After each edit, and before its row is
written, the current values of the touched tensors (and their unedited values) are saved
atomically in one safetensors file; on restart they are put back as one undoable edit, the
row of that step is written if it was not, and the run goes on. No step is measured twice and
none is lost. When the run ends (or fails), the stack is undone: the model is bit-identical to
what it was before.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import metrics, perplexity
from .editors import EditError, EditStack, get_editor
from .editors.base import apply_state
from .experiments import apply_case
from .models import LoadedModel
from .nethook import get_parameter
from .paths import in_repo
from .store import ResultStore

SEQ_KEY = ("experiment", "run", "model", "editor", "step")
DOWNSTREAM_KEY = SEQ_KEY + ("task", "metric")


def param_change(w0: torch.Tensor, wt: torch.Tensor, cond_0: float | None = None) -> dict:
    """Cumulative change of one weight matrix: delta_norm, rel_change, norm_growth, cond (and cond_0)."""
    w0, wt = w0.double(), wt.double()
    d = (wt - w0).norm().item()
    n0 = w0.norm().item()
    return dict(delta_norm=d, rel_change=d / n0, norm_growth=wt.norm().item() / n0,
                cond=torch.linalg.cond(wt).item(), cond_0=cond_0 if cond_0 is not None else torch.linalg.cond(w0).item())


class RunState:
    """The weights of a sequential run after its last completed step, in one file (atomic replace)."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint

    def load(self) -> tuple[int, dict, dict] | None:
        """(step, current tensors, unedited tensors), or None before the first step."""
        if not self.path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{self.path} belongs to another run (other cases, editor or model); "
                             "delete it to start this run afresh")
        tensors = load_file(self.path)
        current = {k[len("current/"):]: v for k, v in tensors.items() if k.startswith("current/")}
        original = {k[len("original/"):]: v for k, v in tensors.items() if k.startswith("original/")}
        return int(meta["step"]), current, original

    def save(self, step: int, current: dict, original: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        tensors = {f"current/{k}": v.detach().cpu().contiguous() for k, v in current.items()}
        tensors.update({f"original/{k}": v.detach().cpu().contiguous() for k, v in original.items()})
        save_file(tensors, tmp, metadata=dict(step=str(step), fingerprint=self.fingerprint))
        os.replace(tmp, self.path)


def _fingerprint(lm: LoadedModel, editor, cases: list[dict], run: str) -> str:
    ids = [(c.get("dataset"), c.get("case_id")) for c in cases]
    return hashlib.sha256(json.dumps([lm.spec.name, editor.name, run, repr(getattr(editor, "hparams", None)), ids],
                                     default=str).encode()).hexdigest()[:16]


def sequential_run(lm: LoadedModel, editor, cases: list[dict], store: ResultStore, run: str,
                   experiment: str = "sequential", ppl_size: int = 50, state_dir: str | Path = "results/state",
                   downstream_steps=(), downstream_store: ResultStore | None = None, downstream_kwargs=None,
                   threshold: float = perplexity.COLLAPSE_THRESHOLD, editor_kwargs: dict | None = None) -> int:
    """Edit the model with every case in order (one `editor`, a name or an Editor), one row per step.

    Rows are keyed by SEQ_KEY; `run` names the case sequence (e.g. "hard", "normal"). Downstream
    scores (`downstream.evaluate_all(lm, **downstream_kwargs)`) go to `downstream_store` at the
    steps listed in `downstream_steps`. Returns the number of rows written by this call.
    """
    editor = get_editor(editor, **(editor_kwargs or {})) if isinstance(editor, str) else editor
    with store.writing(), (downstream_store.writing() if downstream_store is not None else nullcontext()):
        return _run(lm, editor, cases, store, run, experiment, ppl_size, state_dir, downstream_steps,
                    downstream_store, downstream_kwargs, threshold)


def _run(lm, editor, cases, store, run, experiment, ppl_size, state_dir, downstream_steps, downstream_store,
         downstream_kwargs, threshold) -> int:
    """sequential_run's body, with the writers' locks held (released when the run ends or fails)."""
    ids = dict(experiment=experiment, run=run, model=lm.spec.name, editor=editor.name)
    done = {k[-1] for k in store.done() if k[:4] == tuple(ids.values())}
    state = RunState(in_repo(state_dir) / lm.spec.name / editor.name / f"{experiment}_{run}.safetensors",
                     _fingerprint(lm, editor, cases, run))
    saved = state.load()
    start = saved[0] if saved else 0
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
            from .downstream import evaluate_all

            have = downstream_store.done()
            for r in evaluate_all(lm, **(downstream_kwargs or {})).to_dict("records"):
                r = dict(ids, step=step, **r)
                if downstream_store.normalize_key([r[k] for k in downstream_store.key]) not in have:
                    downstream_store.append(r)
        ppl = perplexity.me_ppl(lm, ppl_size, progress=False)
        tensors = {n: param_change(original[n].to(lm.device), get_parameter(lm.model, n).detach(),
                                   cond_0.get(n)) for n in original}
        cond_0.update({n: t["cond_0"] for n, t in tensors.items()})
        store.append(dict(ids, step=step, **_case_columns(case), **row, ppl=ppl["mean"], ppl_median=ppl["median"],
                          ppl_size=ppl_size, collapsed=bool(perplexity.is_collapsed(ppl["mean"], threshold)),
                          tensors=tensors, **_worst(tensors)))
        written += 1

    original = dict(saved[2]) if saved else {}
    with EditStack(lm) as stack:
        if 0 not in done:
            measure(0, None, dict(error=None))
        if saved:
            stack.results.append(apply_state(lm, saved[1], label="resumed state"))
            if start not in done:
                measure(start, cases[start - 1], dict(error=None, resumed=True))
        for step in tqdm(range(start + 1, len(cases) + 1), desc=f"{editor.name} {run} on {lm.spec.name}",
                         initial=start, total=len(cases)):
            case = cases[step - 1]
            t0 = time.perf_counter()
            try:
                result, reference = apply_case(lm, lambda request: stack.apply(editor, request), case)
            except EditError as e:
                state.save(step, {n: get_parameter(lm.model, n) for n in original}, original)
                measure(step, case, dict(error=f"{type(e).__name__}: {e}"))
                continue
            for name, value in result.saved.items():
                original.setdefault(name, value.detach().cpu().clone())
            state.save(step, {n: get_parameter(lm.model, n) for n in original}, original)
            row = dict(error=None, **metrics.edit_metrics(lm, case, reference),
                       **{f"edit_{k}": v for k, v in result.scalars().items()},
                       seconds_edit=result.seconds["total"], seconds_step=time.perf_counter() - t0)
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
    """The store `<results_dir>/<name>.jsonl` keyed by `key` (SEQ_KEY; DOWNSTREAM_KEY for downstream rows)."""
    return ResultStore(in_repo(results_dir) / f"{name}.jsonl", key=key)
