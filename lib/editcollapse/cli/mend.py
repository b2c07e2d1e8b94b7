"""`python -m editcollapse.cli.mend train|evaluate`: train MEND on a model, or edit held-out cases with it.

`train` trains g and η with the preset's steps (`--profile paper`: its longer run) and saves the
checkpoint to cache_dir()/mend/<model>/ (what `make train-mend` runs); `evaluate` edits held-out
CounterFact (or zsRE) cases with the saved checkpoint and writes eval_<dataset>.json beside it.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ..editors.mend import MEND, checkpoint_dir, evaluate, held_out_cases, train_and_save
from ..paths import atomic_write_text


def curve_table(curve: list[dict], rows: int = 12) -> str:
    """The training curve as a text table: means over equal windows of steps, and the validation rows."""
    def mean(window, key):
        return sum(r[key] for r in window) / len(window)

    train_rows = [r for r in curve if "loss" in r]
    if not train_rows:
        return "(no training steps)"
    size = max(1, math.ceil(len(train_rows) / rows))
    lines = [f"{'steps':>11} {'loss':>8} {'L_edit':>8} {'L_loc':>8} {'nll pre':>8} {'nll edit':>8} "
             f"{'nll reph':>8} {'eta':>9}"]
    for i in range(0, len(train_rows), size):
        w = train_rows[i:i + size]
        lines.append(f"{w[0]['step']:>5}-{w[-1]['step']:<5} " + " ".join(
            f"{mean(w, k):8.3f}" for k in ("loss", "l_edit", "l_loc", "nll_pre", "nll_edit", "nll_rephrase"))
                     + f" {mean(w, 'edit_lr'):9.2e}")
    val = [r for r in curve if "val_success" in r]
    if val:
        lines.append(f"{'validation':>11} {'L_edit':>8} {'L_loc':>8} {'nll pre':>8} {'nll edit':>8} {'success':>8}")
        lines += [f"{'step ' + str(r['step']):>11} {r['val_l_edit']:8.3f} {r['val_l_loc']:8.4f} "
                  f"{r['val_nll_pre']:8.3f} "
                  f"{r['val_nll_edit']:8.3f} {r['val_success']:8.2f}" for r in val]
    return "\n".join(lines)


def main(argv=None) -> None:
    from ..models.loading import load_model

    ap = argparse.ArgumentParser(prog="python -m editcollapse.cli.mend", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train MEND on a model; save it under cache_dir()/mend/<model>/")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--steps", type=int, default=None,
                   help="default: the preset's train_steps (PROFILE=paper: train_steps_paper)")
    t.add_argument("--profile", choices=("quick", "paper"), default="quick")
    t.add_argument("--out", default=None, help="folder (default cache_dir()/mend/<model>)")
    t.add_argument("--val", type=int, default=8, help="held-out CounterFact cases validated every --val-every steps")
    t.add_argument("--val-every", type=int, default=50)
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override preset settings (JSON values)")
    e = sub.add_parser("evaluate", help="edit held-out CounterFact cases with the saved checkpoint")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--cases", type=int, default=20)
    e.add_argument("--dataset", choices=("counterfact", "zsre"), default="counterfact")
    e.add_argument("--checkpoint", default=None)
    for p in (t, e):
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    if args.command == "train":
        overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
        ckpt, folder = train_and_save(lm, args.profile, args.steps, overrides, args.val, args.val_every, args.out)
        print(curve_table(ckpt.curve))
        print(f"saved {folder} ({ckpt.meta['seconds']:.0f} s, {ckpt.meta['seconds'] / ckpt.meta['steps']:.2f} s/step; "
              f"edit lrs {[f'{x:.2e}' for x in ckpt.meta['edit_lrs']]})")
    else:
        editor = MEND(checkpoint=args.checkpoint)
        res = evaluate(lm, editor, held_out_cases(args.cases, args.dataset))
        folder = Path(args.checkpoint) if args.checkpoint else checkpoint_dir(args.model)
        atomic_write_text(folder / f"eval_{args.dataset}.json", json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
