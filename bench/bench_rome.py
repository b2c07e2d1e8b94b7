"""Seconds per ROME edit on one model, broken into keys, v* optimisation, update and undo.

    python bench/bench_rome.py [--model smollm2-135m] [--cases 3] [--ppl 50] [--threads 2]

Runs the same CounterFact edits twice: with the cached v* optimisation (our default) and the
papers' way (`fast=False`: the whole batch through the whole model at every step, full-vocabulary
log-softmax), checks both give the same v*, and prints the ratio. Then the same edits followed
by ME-PPL perplexity, as a single-edit sweep does. Context templates are sampled once per model
(as in the papers' code, where they are cached across edits) and timed apart.
"""
from __future__ import annotations

import time

import numpy as np

from common import load, parser
from editcollapse import data
from editcollapse.editors import ROME, EditRequest
from editcollapse.eval.perplexity import me_ppl


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--ppl", type=int, default=50)
    args = ap.parse_args()
    lm = load(args, templates=True)
    cases = data.load_counterfact(n=args.cases, seed=1)
    rows = {True: [], False: []}
    for fast in (True, False):
        for case in cases:
            result = ROME(fast=fast).apply(lm, EditRequest.from_case(case))
            t0 = time.perf_counter()
            result.undo()
            undo = time.perf_counter() - t0
            rows[fast].append(dict(result.seconds, undo=undo, steps=len(result.diagnostics["loss_curve"]),
                                   v=result.diagnostics["v_star"]))
    for fast, label in ((True, "cached (ours)"), (False, "papers' way")):
        r = rows[fast]
        total = np.mean([x["keys"] + x["v_star"] + x["update"] + x["undo"] for x in r])
        print(f"{label:>14}: {total:6.2f} s/edit = keys {np.mean([x['keys'] for x in r]):.3f} + v* "
              f"{np.mean([x['v_star'] for x in r]):.2f} ({np.mean([x['steps'] for x in r]):.0f} steps) + update "
              f"{np.mean([x['update'] for x in r]) * 1e3:.1f} ms + undo {np.mean([x['undo'] for x in r]) * 1e3:.2f} ms")
    diff = max((a["v"] - b["v"]).abs().max().item() / b["v"].abs().max().item()
               for a, b in zip(rows[True], rows[False]))
    fast_t = np.mean([x["v_star"] + x["keys"] for x in rows[True]])
    slow_t = np.mean([x["v_star"] + x["keys"] for x in rows[False]])
    non_v = np.mean([(x["keys"] + x["update"] + x["undo"]) / (x["keys"] + x["v_star"] + x["update"] + x["undo"])
                     for x in rows[True]])
    print(f"speed-up {slow_t / fast_t:.2f}x; max relative difference of v* {diff:.1e}; "
          f"share of the edit outside the v* optimisation {non_v:.1%}")

    t0 = time.perf_counter()
    for case in cases:
        result = ROME().apply(lm, EditRequest.from_case(case))
        me_ppl(lm, args.ppl, progress=False)
        result.undo()
    print(f"edit + ME-PPL_{args.ppl} + undo: {(time.perf_counter() - t0) / len(cases):.2f} s per case")


if __name__ == "__main__":
    main()
