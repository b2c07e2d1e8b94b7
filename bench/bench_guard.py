"""Cost of the collapse guard: one check against one edit with its ME-PPL evaluation, and the screen's speed.

    python bench/bench_guard.py [--model smollm2-135m] [--cases 3] [--ppl 50] [--screen 512] [--threads 2]

For the same CounterFact cases it times (1) `guard.risk` (the keys of the bare prompt and every
context template up to the edited layer, then the denominator), (2) the guard inside
`Guarded(ROME())` (its "guard" phase), and (3) one ROME edit followed by ME-PPL, as a single-edit
sweep does. The target is (1) ≤ 2 % of (3). Then it times the batched screen (`key_features`
with the prefix cache) on `--screen` cases, with all context templates and with 5, and projects
the time for the whole of CounterFact. Context templates are sampled once per model and timed apart.
"""
from __future__ import annotations

import time

import numpy as np

from common import load, parser
from editcollapse import data, guard
from editcollapse.editors import ROME, EditRequest
from editcollapse.eval.perplexity import me_ppl


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--ppl", type=int, default=50)
    ap.add_argument("--screen", type=int, default=512, help="cases timed in the batched screen")
    args = ap.parse_args()
    lm = load(args, templates=True)
    cases = data.load_counterfact(n=args.cases, seed=1)
    guard.risk(lm, cases[0])  # warm-up

    check, inside, edit = [], [], []
    for case in cases:
        t0 = time.perf_counter()
        guard.risk(lm, case)
        check.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = guard.Guarded(ROME(), "warn", threshold=1e9).apply(lm, EditRequest.from_case(case))
        me_ppl(lm, args.ppl, progress=False)
        edit.append(time.perf_counter() - t0 - result.seconds["guard"])
        inside.append(result.seconds["guard"])
        result.undo()
    c, g, e = np.mean(check), np.mean(inside), np.mean(edit)
    print(f"guard.risk: {c:.3f} s per request; guard inside Guarded(ROME()): {g:.3f} s; ROME edit + ME-PPL_{args.ppl}: "
          f"{e:.2f} s per case; ratio {c / e:.2%} (target <= 2 %)")

    screen_cases = data.load_counterfact(n=args.screen, seed=2)
    total = len(data.load_counterfact())
    site = guard.key_site(lm, ROME())
    for n in (None, 5):
        sub = site.subset(n)
        t0 = time.perf_counter()
        guard.key_features(lm, screen_cases, site=sub, batch_size=64)
        dt = time.perf_counter() - t0
        print(f"screen with {len(sub.contexts) - 1} context templates: {len(screen_cases) / dt:.1f} cases/s; "
              f"the whole of CounterFact ({total:,} cases) in {total / (len(screen_cases) / dt) / 60:.1f} min")


if __name__ == "__main__":
    main()
