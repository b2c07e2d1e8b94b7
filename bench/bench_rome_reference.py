"""ROME here against the authors' own ROME code: seconds per edit, side by side in one process.

    python bench/bench_rome_reference.py --reference PATH [--cases 3] [--repeats 2] [--threads 2]
                                         [--model smollm2-135m] [--device cpu|cuda] [--random-weights]

PATH is a checkout of the code of "The Butterfly Effect of Model Editing" and "The Fall of ROME"
(Yang et al. 2024), their fork of EasyEdit, kept OUTSIDE this repository:

    git clone https://github.com/WanliYoung/Collapse-in-Model-Editing PATH

Its files are not changed. The bench imports only `easyeditor/models/rome` (not the package's
`__init__`, which pulls in every other editor and its dependencies) and makes it run on the CPU at
run time: in their `compute_v`, `torch.tensor(..., device="cuda:N")` and `torch.zeros(...)` drop the
device, and `BatchEncoding.to("cuda:N")` goes to the CPU. Nothing else of theirs is touched. On
CUDA (`--device cuda`, the default where there is one) their code runs as it is.

`--random-weights` times the edits on --model's architecture at its published size with random
weights (bench/common.random_model), for the papers' models where their weights are not at hand:
every edit then runs all v* steps on both sides, and only the seconds mean anything.

Both sides edit the same SmolLM2 (editcollapse.models.loading.load_model, passed to theirs as the HF model
and tokenizer) with the same hyper-parameters (our smollm2-135m preset, written into their
ROMEHyperParams) and the same context templates (ours, put into their template cache), one edit
after the other: ours then theirs on each case, the order swapped on every other repeat. Each edit
is undone before the next. An edit is everything from the request to the updated weights (keys,
v* optimisation, update) plus the undo. Prints seconds per edit for each, the ratio per repeat
and its spread, the optimisation steps, and the largest relative difference of v* and of the
weight update ΔW between the two.
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

from common import load, parser, synchronize
from editcollapse import data
from editcollapse.editors import ROME, EditRequest
from editcollapse.models.keys import context_templates, keys_and_values
from editcollapse.models.loading import default_device
from editcollapse.models.nethook import get_parameter
from editcollapse.models.tokens import subject_last_index

HOW_TO_GET = """The reference is the authors' code (their EasyEdit fork). Clone it outside this repository:

    git clone https://github.com/WanliYoung/Collapse-in-Model-Editing /path/outside/the/repo
    python bench/bench_rome_reference.py --reference /path/outside/the/repo
"""


class _CPUTorch(types.ModuleType):
    """`torch` as their compute_v sees it: what it creates on "cuda:N" is created on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, **kwargs)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, **kwargs)


def load_reference(path: Path, on_cpu: bool = True):
    """Their rome module (rome_main, compute_v), importable without their package __init__; `on_cpu`: made
    to run on the CPU (on CUDA it runs as it is)."""
    root = path / "easyeditor"
    if not (root / "models" / "rome" / "compute_v.py").is_file():
        sys.exit(f"{path} is not a checkout of the authors' code (no easyeditor/models/rome/compute_v.py).\n\n"
                 + HOW_TO_GET)
    for name, folder in (("easyeditor", root), ("easyeditor.models", root / "models")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    rome_main = importlib.import_module("easyeditor.models.rome.rome_main")
    if not on_cpu:
        return rome_main
    compute_v = importlib.import_module("easyeditor.models.rome.compute_v")
    compute_v.torch = _CPUTorch("torch")
    from transformers import BatchEncoding

    to = BatchEncoding.to
    BatchEncoding.to = lambda self, device, *a, **k: to(self, "cpu" if "cuda" in str(device) else device, *a, **k)
    return rome_main


def their_hparams(rome_main, lm, hp):
    """Their ROMEHyperParams with our settings (the fields of their hparams/ROME/llama-7b.yaml)."""
    s = lm.spec
    return rome_main.ROMEHyperParams(
        layers=[hp.layer], fact_token="subject_last", v_num_grad_steps=hp.v_num_grad_steps, v_lr=hp.v_lr,
        v_loss_layer=lm.n_layers - 1, v_weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor,
        kl_factor=hp.kl_factor, mom2_adjustment=hp.mom2_adjustment,
        context_template_length_params=[list(x) for x in hp.context_template_length_params],
        rewrite_module_tmp=s.mlp_out, layer_module_tmp=s.layer, mlp_module_tmp=s.mlp, attn_module_tmp=s.attn,
        ln_f_module=s.final_norm, lm_head_module=s.lm_head, mom2_dataset="wikipedia", mom2_n_samples=100000,
        mom2_dtype="float32", alg_name="ROME", device=0, model_name=s.name, stats_dir="")


def run_ours(lm, req: EditRequest, weight: str) -> dict:
    W = get_parameter(lm.model, weight)
    before = W.detach().clone()
    t0, c0 = time.perf_counter(), time.process_time()
    result = ROME().apply(lm, req)
    dW = W.detach() - before
    result.undo()
    synchronize(lm)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    d = result.diagnostics
    return dict(seconds=seconds, cpu=cpu, steps=len(d["loss_curve"]), dW=dW, v_star=d["v_star"])


def run_theirs(rome_main, lm, req: EditRequest, hparams, weight: str) -> dict:
    W = get_parameter(lm.model, weight)
    before = W.detach().clone()
    request = dict(prompt=req.template(), subject=req.subject, target_new=req.target_new)
    log = io.StringIO()
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(log):
        _, saved = rome_main.apply_rome_to_model(lm.model, lm.tok, [request], hparams,
                                                 return_orig_weights=True, keep_original_weight=True)
    dW = W.detach() - before
    with torch.no_grad():
        W[...] = saved[weight]
    synchronize(lm)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert torch.equal(W, before)
    steps = sum(line.startswith("loss ") for line in log.getvalue().splitlines())
    return dict(seconds=seconds, cpu=cpu, steps=steps, dW=dW)


def their_v_star(lm, req: EditRequest, layer: int, dW: torch.Tensor) -> torch.Tensor:
    """v* implied by their update: ΔW = (v* − W k^u) uᵀ/(uᵀk^u) with u = k̄/‖k̄‖, so ΔW k^u = v* − W k^u."""
    tmpl = req.template()
    k_u, Wk = keys_and_values(lm, layer, [tmpl.format(req.subject)], [subject_last_index(lm, tmpl, req.subject)])
    dW = dW if dW.shape[0] == Wk.shape[1] else dW.T  # GPT-2's Conv1D stores the transpose
    return (dW @ k_u[0] + Wk[0]).float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.cpu().float(), b.cpu().float()
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--reference", type=Path, help="a checkout of the authors' code (see --help)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.set_defaults(threads=2)
    args = ap.parse_args()
    if args.reference is None:
        print(HOW_TO_GET)
        sys.exit(2)
    on_cpu = torch.device(args.device or default_device()).type == "cpu"
    rome_main = load_reference(args.reference.resolve(), on_cpu)
    lm = load(args)
    hp = ROME().hparams_for(lm)
    templates = context_templates(lm, hp.context_template_length_params, hp.seed)
    rome_main.CONTEXT_TEMPLATES_CACHE = templates  # theirs samples its own once per process otherwise
    hparams = their_hparams(rome_main, lm, hp)
    weight = lm.spec.module("mlp_out", hp.layer) + ".weight"
    cases = [EditRequest.from_case(c) for c in data.load_counterfact(n=args.cases, seed=1)]
    print(f"layer {hp.layer}, {hp.v_num_grad_steps} steps at most; load average {os.getloadavg()[0]:.2f} at start")

    ours, theirs, diffs = [], [], []
    for r in range(args.repeats):
        row_ours, row_theirs = [], []
        for req in cases:
            for side in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
                if side == "ours":
                    a = run_ours(lm, req, weight)
                    row_ours.append(a)
                else:
                    b = run_theirs(rome_main, lm, req, hparams, weight)
                    row_theirs.append(b)
            a, b = row_ours[-1], row_theirs[-1]
            if r == 0:
                v_theirs = their_v_star(lm, req, hp.layer, b["dW"])
                diffs.append(dict(v_star=rel(a["v_star"], v_theirs), dW=rel(a["dW"], b["dW"])))
            print(f"  repeat {r + 1} {req.subject!r} -> {req.target_new!r}: ours {a['seconds']:.2f} s "
                  f"(CPU {a['cpu']:.2f} s, {a['steps']} steps), theirs {b['seconds']:.2f} s "
                  f"(CPU {b['cpu']:.2f} s, {b['steps']} steps): {b['seconds'] / a['seconds']:.2f}x", flush=True)
        ours.append(row_ours)
        theirs.append(row_theirs)

    for key, label in (("seconds", "wall"), ("cpu", "CPU")):
        t_ours = np.array([[x[key] for x in row] for row in ours])
        t_theirs = np.array([[x[key] for x in row] for row in theirs])
        ratio, per_edit = t_theirs.sum(1) / t_ours.sum(1), t_theirs / t_ours
        print(f"{label:>4}: ours {t_ours.mean():.2f} s/edit ({t_ours.min():.2f}-{t_ours.max():.2f}), theirs "
              f"{t_theirs.mean():.2f} s/edit ({t_theirs.min():.2f}-{t_theirs.max():.2f}); theirs/ours per repeat "
              f"{' '.join(f'{x:.2f}' for x in ratio)}x, per edit {per_edit.min():.2f}-{per_edit.max():.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    print(f"max relative difference: v* {max(d['v_star'] for d in diffs):.1e}, "
          f"update dW {max(d['dW'] for d in diffs):.1e}")


if __name__ == "__main__":
    main()
