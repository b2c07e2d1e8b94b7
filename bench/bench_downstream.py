"""Seconds per downstream task for n items, with the scores obtained.

    .venv/bin/python bench/bench_downstream.py --n 50 [--model smollm2-135m] [--tasks piqa lambada] [--device cpu]
"""
import argparse
import platform
import time

import torch

from editcollapse import downstream as ds
from editcollapse.models import DEFAULT_MODEL, load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=50, help="items per task (a seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", nargs="+", default=list(ds.TASKS), choices=ds.TASKS)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    lm = load_model(args.model, device=args.device)
    print(f"# {args.model} on {lm.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), n={args.n}, seed={args.seed}, batch_size={args.batch_size}")
    print(f"{'task':<10} {'seconds':>8} {'s/item':>7}  metrics")
    for task in args.tasks:
        t0 = time.perf_counter()
        res = ds.evaluate(lm, task, n=args.n, seed=args.seed, batch_size=args.batch_size)
        dt = time.perf_counter() - t0
        metrics = "  ".join(f"{k}={v:.4g}" for k, v in res.items() if k != "n")
        chance = ds.RANDOM_BASELINE[task]
        print(f"{task:<10} {dt:8.1f} {dt / res['n']:7.2f}  {metrics}  (n={res['n']}, chance {chance})", flush=True)


if __name__ == "__main__":
    main()
