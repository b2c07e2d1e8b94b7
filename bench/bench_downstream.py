"""Seconds per downstream task for n items through lm-evaluation-harness, with the scores obtained.

    .venv/bin/python bench/bench_downstream.py --n 50 [--model smollm2-135m] [--tasks piqa lambada] [--device cpu]

With --old FILE, the hand-written evaluator that lm-eval replaced runs side by side on the same
items, and each metric of both is printed (agreement and cost; docs/downstream_lmeval.md):

    git show b197923:lib/editcollapse/downstream.py > /tmp/downstream_old.py
    .venv/bin/python bench/bench_downstream.py --n 100 --old /tmp/downstream_old.py
"""
import argparse
import importlib.util
import platform
import time
from pathlib import Path

import torch

from editcollapse.eval import downstream as ds
from editcollapse.models.loading import DEFAULT_MODEL, load_model


def load_old(path: str):
    """The old evaluator as module editcollapse.downstream_old: its `from . import data` still resolves, its
    `from .models import` is pointed at models.loading (the module has moved since)."""
    source = Path(path).read_text().replace("from .models import", "from .models.loading import")
    spec = importlib.util.spec_from_loader("editcollapse.downstream_old", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(source, path, "exec"), mod.__dict__)
    return mod


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=50, help="items per task (a seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", nargs="+", default=list(ds.TASKS), choices=ds.TASKS)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--old", default=None, help="file of the hand-written evaluator to compare with")
    args = ap.parse_args()

    lm = load_model(args.model, device=args.device)
    old = load_old(args.old) if args.old else None
    ds.evaluate_all(lm, ["lambada"], n=1)  # imports and task index outside the timings
    print(f"# {args.model} on {lm.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), n={args.n}, seed={args.seed}, batch_size={args.batch_size}")
    print(f"{'task':<10} {'lm-eval s':>9} {'old s':>7} {'ratio':>6}  metric: lm-eval (old)")
    total_new = total_old = 0.0
    for task in args.tasks:
        new, t_new = timed(lambda: ds.evaluate(lm, task, n=args.n, seed=args.seed, batch_size=args.batch_size))
        total_new += t_new
        ref, t_old = (timed(lambda: old.evaluate(lm, task, n=args.n, seed=args.seed, batch_size=args.batch_size))
                      if old else ({}, float("nan")))
        total_old += t_old
        metrics = "  ".join(f"{k}={v:.4g}" + (f" ({ref[k]:.4g})" if k in ref else "")
                            for k, v in new.items() if k != "n")
        print(f"{task:<10} {t_new:9.1f} {t_old:7.1f} {t_new / t_old:6.2f}  {metrics}  (n={new['n']}, "
              f"chance {ds.RANDOM_BASELINE[task]})", flush=True)
    print(f"{'total':<10} {total_new:9.1f} {total_old:7.1f} {total_new / total_old:6.2f}")


if __name__ == "__main__":
    main()
