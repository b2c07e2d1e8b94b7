"""Seconds per MEMIT and AlphaEdit edit, ours beside the authors' code, interleaved in one process.

    python bench/bench_memit.py [--model smollm2-135m] [--cases 3] [--threads 2]
                                [--reference PATH] [--alphaedit-reference PATH]

Without references it times ours only: one CounterFact edit after the other, with the breakdown
(templates, v*, C, keys, update, diagnostics) and undo. With references, each case is edited by
ours and by the authors' code in turn (MEMIT, their MEMIT, AlphaEdit, their AlphaEdit), with
the same hyper-parameters (our preset for the model), the same context templates and the same
C (handed to their cache), and the model restored after each edit; it prints their breakdown
(v* = compute_z, keys = compute_ks and the residual reads, the rest = update and bookkeeping),
the ratio, and how far their z* and ΔW are from ours.

--reference: the Butterfly-Effect authors' EasyEdit fork (github WanliYoung/Collapse-in-Model-
Editing, easyeditor/models/memit). --alphaedit-reference: the AlphaEdit authors' code (github
jianghoucheng/AlphaEdit). Fetch them outside the repository (never commit them) and patch them
only to run on this CPU and on transformers 5, whose decoder layers return a tensor, not a tuple:

    sed -i 's/f"cuda:{hparams.device}"/"cpu"/g; s/"cuda"/"cpu"/g; s/\\.cuda()/.cpu()/g' \\
        EASYEDIT/easyeditor/models/memit/{compute_z,memit_main}.py ALPHAEDIT/AlphaEdit/{compute_z,AlphaEdit_main}.py
    sed -i 's/cur_out\\[0\\]/cur_out/g; s/\\.output\\[0\\]$/.output/' \\
        EASYEDIT/easyeditor/models/memit/compute_z.py ALPHAEDIT/AlphaEdit/compute_z.py

Their packages are imported as they are, except that easyeditor's top-level __init__ files (which
import every editor of EasyEdit and their dependencies) are skipped.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from common import load, parser
from editcollapse import data
from editcollapse.editors import AlphaEdit, EditRequest, MEMIT
from editcollapse.editors.alphaedit import null_space
from editcollapse.editors.memit import moment
from editcollapse.models.keys import context_templates
from editcollapse.models.nethook import get_parameter


class Clock:
    """Wraps module functions so that their seconds add up under one phase name."""

    def __init__(self):
        self.seconds, self.last = {}, {}

    def wrap(self, module, name: str, phase: str):
        fn = getattr(module, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0
            self.last[name] = out
            return out
        setattr(module, name, timed)


def common_hparams(lm, hp, lm_head: str) -> dict:
    s = lm.spec
    return dict(layers=list(hp.layers), layer_selection="all", fact_token="subject_last",
                v_num_grad_steps=hp.v_num_grad_steps, v_lr=hp.v_lr, v_loss_layer=lm.n_layers - 1,
                v_weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor,
                mom2_adjustment=True, rewrite_module_tmp=s.mlp_out, layer_module_tmp=s.layer, mlp_module_tmp=s.mlp,
                attn_module_tmp=s.attn, ln_f_module=s.final_norm, lm_head_module=lm_head, mom2_dataset="wikipedia",
                mom2_n_samples=hp.mom2_n_tokens or 0, mom2_dtype="float32")


class Reference:
    """One of the authors' implementations, set up with our hyper-parameters, templates and C."""

    def __init__(self, lm, hp, templates: list[str], kind: str, path: Path):
        self.lm, self.hp, self.kind = lm, hp, kind
        params = dict(lm.model.named_parameters())
        lm_head = "lm_head" if "lm_head.weight" in params else lm.spec.embed  # tied embeddings
        common = common_hparams(lm, hp, lm_head)
        if kind == "memit":
            for pkg, sub in [("easyeditor", ""), ("easyeditor.models", "models"), ("easyeditor.models.rome", "models/rome")]:
                mod = types.ModuleType(pkg)
                mod.__path__ = [str(path / "easyeditor" / sub)]
                sys.modules[pkg] = mod
            self.main = importlib.import_module("easyeditor.models.memit.memit_main")
            self.hparams = self.main.MEMITHyperParams(**common, mom2_update_weight=hp.mom2_update_weight,
                                                      alg_name="MEMIT", device=0, model_name=lm.spec.name, stats_dir="")
        else:
            sys.path.insert(0, str(path))
            cwd = os.getcwd()
            os.chdir(path)  # their util.globals reads ./globals.yml
            try:
                self.main = importlib.import_module("AlphaEdit.AlphaEdit_main")
            finally:
                os.chdir(cwd)
            self.hparams = self.main.AlphaEditHyperParams(**common, model_name=lm.spec.name, mom2_update_weight=0.0,
                                                          nullspace_threshold=hp.nullspace_threshold, L2=hp.L2)
            self.P = torch.stack([null_space(lm, layer, hp.mom2_n_tokens, hp.nullspace_threshold).float()
                                  for layer in hp.layers])
        self.main.CONTEXT_TEMPLATES_CACHE = [["{}"], templates[1:]]
        key = lm.model.config._name_or_path.replace("/", "_")
        for layer in hp.layers:
            self.main.COV_CACHE[key, lm.spec.module("mlp_out", layer)] = moment(lm, layer, hp.mom2_n_tokens).C.float()
        self.clock = Clock()
        self.clock.wrap(self.main, "compute_z", "v_star")
        self.clock.wrap(self.main, "compute_ks", "keys")
        self.clock.wrap(self.main, "get_module_input_output_at_words", "keys")
        self.names = [lm.spec.module("mlp_out", layer) + ".weight" for layer in hp.layers]

    def edit(self, request: EditRequest) -> dict:
        """Apply, time, restore; returns the seconds and the weight changes."""
        lm, target = self.lm, request.target_new
        saved = {n: get_parameter(lm.model, n).detach().clone() for n in self.names}
        self.clock.seconds = {}
        t0, c0 = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):
            if self.kind == "memit":
                req = dict(prompt=request.template(), subject=request.subject, target_new=target, case_id=0)
                self.main.apply_memit_to_model(lm.model, lm.tok, [req], self.hparams, copy=False,
                                               return_orig_weights=True, keep_original_weight=True)
            else:
                req = dict(prompt=request.template(), subject=request.subject, target_new={"str": target}, case_id=0)
                d_k = self.P.shape[1]
                self.main.apply_AlphaEdit_to_model(lm.model, lm.tok, [req], self.hparams, cache_template=None,
                                                   cache_c=torch.zeros(len(self.names), d_k, d_k), P=self.P)
        total = time.perf_counter() - t0
        deltas = {n: (get_parameter(lm.model, n) - saved[n]).detach().clone() for n in self.names}
        t0 = time.perf_counter()
        with torch.no_grad():
            for n, v in saved.items():
                get_parameter(lm.model, n).copy_(v)
        seconds = dict(self.clock.seconds, undo=time.perf_counter() - t0)
        seconds["rest"] = total - seconds.get("v_star", 0) - seconds.get("keys", 0)
        return dict(seconds=seconds, total=total + seconds["undo"], cpu=time.process_time() - c0, deltas=deltas,
                    z=self.clock.last["compute_z"].detach().double().cpu())


def ours(lm, editor, request: EditRequest) -> dict:
    c0 = time.process_time()
    result = editor.apply(lm, request)
    deltas = {n: (get_parameter(lm.model, n) - v).detach().clone() for n, v in result.saved.items()}
    t0 = time.perf_counter()
    result.undo()
    seconds = dict(result.seconds, undo=time.perf_counter() - t0)
    return dict(seconds=seconds, total=seconds["total"] + seconds["undo"], cpu=time.process_time() - c0, deltas=deltas,
                z=result.diagnostics["v_star"][0], curve=result.diagnostics["loss_curves"][0])


def summary(label: str, rows: list[dict]) -> float:
    total = np.mean([r["total"] for r in rows])
    phases = [p for p in rows[0]["seconds"] if p != "total"]
    parts = " + ".join(f"{p} {np.mean([r['seconds'].get(p, 0) for r in rows]):.2f}" for p in phases)
    print(f"{label:>22}: {total:6.2f} s/edit = {parts}; CPU {np.mean([r['cpu'] for r in rows]):.2f} s/edit")
    return total


def ratios(mine: list[dict], theirs: list[dict]) -> str:
    """theirs/ours per case, wall and CPU time, with the spread over cases."""
    out = []
    for key in ("total", "cpu"):
        r = np.array([b[key] / a[key] for a, b in zip(mine, theirs)])
        total = sum(b[key] for b in theirs) / sum(a[key] for a in mine)
        out.append(f"{'wall' if key == 'total' else 'CPU'} {total:.2f}x (per case {r.min():.2f}-{r.max():.2f}x)")
    return "ours is faster by " + ", ".join(out)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--reference", type=Path, help="the EasyEdit fork of the Butterfly-Effect authors (MEMIT)")
    ap.add_argument("--alphaedit-reference", type=Path, help="the AlphaEdit authors' repository")
    args = ap.parse_args()
    lm = load(args)
    editors = {"memit": MEMIT(), "alphaedit": AlphaEdit()}
    t0 = time.perf_counter()
    templates = {}
    for kind, ed in editors.items():
        hp = ed.hparams_for(lm)
        templates[kind] = context_templates(lm, hp.context_template_length_params, hp.seed)
        ed.prepare(lm, hp)  # C (and P): computed once per model and layer, cached, not part of an edit
        print(f"{kind}: {hp}")
    print(f"templates, C and P ready in {time.perf_counter() - t0:.1f} s; load average {os.getloadavg()[0]:.2f}")
    refs = {}
    for kind, path in (("memit", args.reference), ("alphaedit", args.alphaedit_reference)):
        if path is not None:
            refs[kind] = Reference(lm, editors[kind].hparams_for(lm), templates[kind], kind, path.resolve())
    rows = {k: [] for k in ("memit", "alphaedit", "ref memit", "ref alphaedit")}
    cases = data.load_counterfact(n=args.cases, seed=1)
    for i, case in enumerate(cases):
        request = EditRequest.from_case(case)
        for kind, ed in editors.items():
            if kind in refs and i % 2:  # theirs first on every other case
                rows["ref " + kind].append(refs[kind].edit(request))
            rows[kind].append(ours(lm, ed, request))
            if kind in refs and not i % 2:
                rows["ref " + kind].append(refs[kind].edit(request))
            if kind in refs:
                a, b = rows[kind][-1], rows["ref " + kind][-1]
                dw = max(rel(a["deltas"][n], b["deltas"][n]) for n in b["deltas"])
                print(f"case {case['case_id']} {kind}: ours {a['total']:.2f} s (CPU {a['cpu']:.2f} s), theirs "
                      f"{b['total']:.2f} s (CPU {b['cpu']:.2f} s), {len(a['curve'])} steps ours; "
                      f"|z*-z*_ref|/|z*_ref| {rel(a['z'], b['z']):.1e}, max |dW-dW_ref|/|dW_ref| {dw:.1e}", flush=True)
            else:
                print(f"case {case['case_id']} {kind}: {rows[kind][-1]['total']:.2f} s", flush=True)
    for kind in editors:
        summary(f"{kind} (ours)", rows[kind])
        if rows["ref " + kind]:
            summary(f"{kind} (authors')", rows["ref " + kind])
            print(f"{'':>22}  {ratios(rows[kind], rows['ref ' + kind])}")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
