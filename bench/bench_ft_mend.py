"""Seconds per FT-L∞ and MEND edit on one model, with their breakdown, and MEND's training seconds per step.

    python bench/bench_ft_mend.py [--model smollm2-135m] [--cases 3] [--train-steps 10] [--threads 1]

FT-L∞: tokens, the fine-tuning loop (steps run), the final loss, undo. MEND: loading the
checkpoint, the gradient factors (one forward and backward), the update (g and the outer
products), the post-edit loss, undo. MEND uses the trained checkpoint in the cache when there
is one (`make train-mend`); otherwise the network trained here for the timing (the seconds of an
edit do not depend on how long it was trained). The same CounterFact cases for both editors.
"""
from __future__ import annotations

import time

import numpy as np

from common import load, parser
from editcollapse import data
from editcollapse.editors import FT, MEND, EditRequest
from editcollapse.editors.mend import checkpoint_dir, train


def timed_edits(lm, editor, cases) -> list[dict]:
    rows = []
    for case in cases:
        result = editor.apply(lm, EditRequest.from_case(case))
        t0 = time.perf_counter()
        result.undo()
        rows.append(dict(result.seconds, undo=time.perf_counter() - t0, **result.scalars()))
    return rows


def line(label: str, rows: list[dict], phases: list[str], extra: str = "") -> str:
    parts = " + ".join(f"{p} {np.mean([r.get(p, 0.0) for r in rows]):.3f}" for p in phases)
    total = np.mean([r["total"] + r["undo"] for r in rows])
    return f"{label:>8}: {total:6.2f} s/edit = {parts} + undo {np.mean([r['undo'] for r in rows]) * 1e3:.2f} ms{extra}"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--train-steps", type=int, default=10, help="MEND training steps timed")
    args = ap.parse_args()
    lm = load(args)
    print(f"{args.cases} CounterFact edits")
    cases = data.load_counterfact("val", n=args.cases, seed=1)

    hp = MEND().hparams_for(lm)
    ckpt = train(lm, hp, steps=args.train_steps, cases=data.load_counterfact("train", n=500, seed=1), progress=False)
    seconds = np.diff([r["seconds"] for r in ckpt.curve])
    print(f"MEND training: {np.mean(seconds):.2f} s/step (median {np.median(seconds):.2f}, {args.train_steps} steps of "
          f"{hp.batch_size} edit(s), layers {list(hp.layers)}, rank {hp.rank}); {hp.train_steps} steps (quick "
          f"profile) ≈ {np.mean(seconds) * hp.train_steps / 60:.1f} min")
    cached = (checkpoint_dir(args.model) / "mend.pt").exists()
    mend = MEND() if cached else MEND(checkpoint=ckpt)
    print(f"MEND checkpoint: {'the cached one, ' + str(checkpoint_dir(args.model)) if cached else 'trained here'}")

    ft = timed_edits(lm, FT(), cases)
    print(line("FT-L∞", ft, ["tokens", "fine_tune", "final_loss"],
               f"; {np.mean([r['ft_steps'] for r in ft]):.0f} steps, "
               f"{np.mean([r['fine_tune'] / max(1, r['ft_steps']) for r in ft]):.3f} s/step"))
    rows = timed_edits(lm, mend, cases)
    print(line("MEND", rows, ["load", "factors", "update", "post"]))
    rows = timed_edits(lm, mend, cases)
    print(line("MEND", rows, ["load", "factors", "update", "post"], " (checkpoint already loaded)"))


if __name__ == "__main__":
    main()
