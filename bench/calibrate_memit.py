"""Calibration sweep of MEMIT / AlphaEdit settings on one model (docs/memit_calibration.md).

    python bench/calibrate_memit.py --layers 4,5,6,7,8 3,4,5,6,7 \\
        --settings memit:mom2_update_weight=15000 memit:mom2_update_weight=2000 \\
                   alphaedit:nullspace_threshold=2e-2,L2=10 [--cases 12] [--ppl 50] [--model smollm2-135m]

For each layer set, z* of every case is computed once (it depends only on the last layer and the
v* settings, which every setting must share); every setting (an editor and overrides of its
spread: mom2_update_weight, mom2_n_tokens, nullspace_threshold, L2) then edits each case alone
from that z*, is scored with metrics.edit_metrics (CounterFact's efficacy: P(new) > P(true) after
the prompt), optionally ME-PPL_N, and is undone. Prints one markdown row per (layers, setting).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import fields

import numpy as np

from editcollapse import data, load_model, machine

from editcollapse.eval import metrics
from editcollapse.editors import AlphaEdit, EditRequest, MEMIT
from editcollapse.editors.base import WeightTransaction
from editcollapse.editors.vstar import VStarParams, compute_v_star
from editcollapse.experiments.single import subject_is_first_token
from editcollapse.eval.perplexity import me_ppl

SPREAD = {"mom2_update_weight", "mom2_n_tokens", "nullspace_threshold", "L2"}


def setting(text: str) -> tuple[str, dict]:
    """"alphaedit:nullspace_threshold=2e-2,L2=10" -> ("alphaedit", {...})."""
    name, _, items = text.partition(":")
    out = {}
    for item in filter(None, items.split(",")):
        key, value = item.split("=")
        if key not in SPREAD:
            raise SystemExit(f"settings are of the spread only ({', '.join(sorted(SPREAD))}), not {key}")
        out[key] = int(value) if key == "mom2_n_tokens" else float(value)
    return name, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", nargs="+", required=True, help="layer sets, e.g. 4,5,6,7,8 3,4,5,6,7")
    ap.add_argument("--settings", nargs="+", default=["memit:"], help="editor:key=value,key=value ...")
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppl", type=int, default=0, help="ME-PPL_N after each edit (0: off)")
    args = ap.parse_args()
    editors = {"memit": MEMIT, "alphaedit": AlphaEdit}
    settings = [setting(s) for s in args.settings]
    lm = load_model(args.model)
    cases = data.load_counterfact(n=args.cases, seed=args.seed)
    refs = [metrics.locality_reference(lm, c) for c in cases]
    before = [metrics.edit_metrics(lm, c, r) for c, r in zip(cases, refs)]
    first = sum(subject_is_first_token(lm, c) for c in cases)
    print(f"{args.model} ({machine.summary()}), {len(cases)} CounterFact cases (seed {args.seed}, {first} with the subject "
          f"first); unedited efficacy {np.mean([b['efficacy'] for b in before]):.2f}, "
          f"P(new) {np.mean([b['p_new'] for b in before]):.4f}")
    if args.ppl:
        print(f"unedited ME-PPL_{args.ppl} {me_ppl(lm, args.ppl, progress=False)['mean']:.1f}")
    print("| layers | editor, setting | efficacy | efficacy_acc | generalization | locality | P(new) | realised | written "
          "| ‖ΔW‖ | ME-PPL | s/case |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layers in args.layers:
        layers = [int(x) for x in layers.split(",")]
        hps = [editors[name](hparams=dict(layers=layers, **over)).hparams_for(lm) for name, over in settings]
        if len({tuple(getattr(h, f.name) for f in fields(VStarParams)) for h in hps}) > 1:
            raise SystemExit("the settings have different v* settings; sweep them in separate runs")
        ed, hp = MEMIT(), hps[0]
        targets = []
        for case in cases:
            request = EditRequest.from_case(case)
            templates, texts, idxs, weights = ed.inputs(lm, hp, [request])
            z, _, _ = compute_v_star(lm, request, templates, hp, lm.spec.module("layer", layers[-1]))
            targets.append((texts, idxs, weights, z[None].double().cpu()))
        for (name, over), hp in zip(settings, hps):
            ed = editors[name](hparams=dict(layers=layers, **over))
            ed.clock = {}
            rows, t0 = [], time.perf_counter()
            for case, ref, (texts, idxs, weights, z) in zip(cases, refs, targets):
                tx = WeightTransaction(lm)
                try:
                    d = ed.spread(lm, hp, texts, idxs, weights, z, tx)
                    m = metrics.edit_metrics(lm, case, ref)
                    ppl = me_ppl(lm, args.ppl, progress=False)["mean"] if args.ppl else float("nan")
                    dw = sum(x["delta_norm"] ** 2 for x in d["layer_diagnostics"]) ** 0.5
                    rows.append([m["efficacy"], m["efficacy_acc"], m["generalization"], m["locality"], m["p_new"],
                                 d["realised_fraction"], d["written_fraction"], dw, ppl])
                finally:
                    tx.restore()
            r = np.array(rows)
            label = ", ".join([name] + [f"{k}={v:g}" for k, v in over.items()])
            ppl = f"{np.mean(r[:, 8]):.1f} (max {np.max(r[:, 8]):.0f})" if args.ppl else "–"
            print(f"| {layers[0]}–{layers[-1]} | {label} | {r[:, 0].mean():.2f} | {r[:, 1].mean():.2f} | "
                  f"{r[:, 2].mean():.2f} | {r[:, 3].mean():.2f} | {r[:, 4].mean():.3f} | {r[:, 5].mean():.2f} | "
                  f"{r[:, 6].mean():.2f} | {r[:, 7].mean():.2f} | {ppl} | {(time.perf_counter() - t0) / len(cases):.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
