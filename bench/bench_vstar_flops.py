"""Arithmetic of one v* step, ours (cached) against the papers' way, counted by torch's FlopCounterMode.

    python bench/bench_vstar_flops.py [--model smollm2-135m] [--cases 3] [--threads 2]

For ROME (v* at its MLP's output) and MEMIT (at the residual after its last layer), on the same
CounterFact cases as bench_rome_reference.py and bench_memit.py (seed 1), one step (forward and
backward with respect to δ) of `vstar._CachedForward` and of `vstar._FullForward` (the whole batch
through the whole model, full-vocabulary log-softmax at every position: what the authors' compute_v
and compute_z do). Prints GFLOP per step, their ratio, and the wall time of five steps of each with
the GFLOP/s they reach. The FLOP ratio is the most a step can gain; the time ratio shows how much of it
this machine turns into speed (small matrix products run further from the CPU's peak).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import load, parser
from editcollapse import data
from editcollapse.editors import MEMIT, ROME, EditRequest
from editcollapse.editors import vstar
from editcollapse.editors.vstar import _build_prompts, _CachedForward, _FullForward
from editcollapse.models.keys import context_templates


@contextmanager
def unpacked():
    """Our step without oneDNN-packed weights (the same arithmetic, in products FlopCounterMode counts)."""
    saved, vstar._PACK_MAX_BYTES = vstar._PACK_MAX_BYTES, 0
    try:
        yield
    finally:
        vstar._PACK_MAX_BYTES = saved


def step(forward, delta):
    tgt, kl, _ = forward(delta)
    (tgt.sum() + kl.sum()).backward()


def main() -> None:
    args = parser(__doc__).parse_args()
    lm = load(args)
    cases = [EditRequest.from_case(c) for c in data.load_counterfact(n=args.cases, seed=1)]
    for editor in (ROME(), MEMIT()):
        hp = editor.hparams_for(lm)
        module = lm.spec.module("mlp", hp.layer) if editor.name == "rome" else lm.spec.module("layer", hp.layers[-1])
        templates = context_templates(lm, hp.context_template_length_params, hp.seed)
        for req in cases:
            prompts = _build_prompts(lm, req, templates, hp.kl_prompt)
            figures = []
            for cls in (_CachedForward, _FullForward):
                delta = torch.zeros(lm.model.config.hidden_size, device=lm.device, requires_grad=True)
                with unpacked():  # the same arithmetic, in the products that FlopCounterMode knows
                    counted = cls(lm, prompts, module)
                    with FlopCounterMode(display=False) as counter:
                        step(counted, delta)
                forward = cls(lm, prompts, module)
                t0 = time.perf_counter()
                for _ in range(5):
                    step(forward, delta)
                seconds = (time.perf_counter() - t0) / 5
                figures.append((counter.get_total_flops() / 1e9, seconds))
            (f_ours, t_ours), (f_full, t_full) = figures
            print(f"{editor.name:>6} {req.subject!r:>24}: ours {f_ours:6.1f} GFLOP/step in {t_ours * 1e3:4.0f} ms "
                  f"({f_ours / t_ours:4.0f} GFLOP/s), papers' way {f_full:6.1f} in {t_full * 1e3:4.0f} ms "
                  f"({f_full / t_full:4.0f} GFLOP/s): FLOP ratio {f_full / f_ours:.2f}, time ratio {t_full / t_ours:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
