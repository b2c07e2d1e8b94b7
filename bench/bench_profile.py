"""The cost of a profile's sequential experiment (notebook 03), estimated on this machine before it runs.

    .venv/bin/python bench/bench_profile.py [--profile local] [--steps 2]

Times, in one process: a short sequential run per editor (seconds per step: the edit, its metrics,
ME-PPL_50 and the parameter change), ME-PPL at the checkpoint size, and the downstream evaluation; then
multiplies them by the profile's counts (runs, steps, checkpoints, downstream evaluations) and prints the
plan per editor and in all, with the machine.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from editcollapse import data, machine, reproduce
from editcollapse.eval.downstream import evaluate_all
from editcollapse.models.loading import load_model
from editcollapse.eval.perplexity import me_ppl
from editcollapse.experiments.sequential import sequential_run, sequential_store


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="local")
    ap.add_argument("--steps", type=int, default=2, help="steps timed per editor")
    a = ap.parse_args()
    _, params = reproduce.prepare(a.profile, ["03"])
    p = params["03_sequential_edit"]
    print(f"profile {a.profile}, notebook 03 on {p['model']}; {machine.summary()}")
    lm = load_model(p["model"], device=p["device"])
    cases = data.load_counterfact(n=a.steps, seed=7)
    per_step = {}
    with tempfile.TemporaryDirectory() as tmp:
        for editor in dict.fromkeys(p["editors"] + p["random_editors"]):
            store = sequential_store(tmp, editor)
            sequential_run(lm, editor, cases[:1], store, run="warm", state_dir=Path(tmp) / "state")  # C, templates, MEND
            t = seconds(lambda: sequential_run(lm, editor, cases, store, run="timed", state_dir=Path(tmp) / "state"))
            per_step[editor] = t / (a.steps + 1)  # step 0 (ME-PPL of the unedited model) is one of them
            print(f"  {editor}: {per_step[editor]:.1f} s per step", flush=True)
    big = seconds(lambda: me_ppl(lm, p["n_ppl_checkpoint"], progress=False)) if p["n_ppl_checkpoint"] else 0.0
    tasks = p["downstream_tasks"]
    down = seconds(lambda: evaluate_all(lm, tasks=tasks, n=p["n_downstream"], seed=p["seed"])) if tasks else 0.0
    print(f"  ME-PPL_{p['n_ppl_checkpoint']}: {big:.1f} s; downstream {tasks} x {p['n_downstream']}: {down:.1f} s")

    n_down = 2 if p["downstream_at_start"] else 1
    n_check = p["n_checkpoints"] if p["n_ppl_checkpoint"] else 0
    rows, total = [], 0.0
    for editor in dict.fromkeys(p["editors"] + p["random_editors"]):
        runs = [(r, p["n_cases"]) for r in ("hard", "normal") if editor in p["editors"]]
        runs += [("random", p["n_random"])] if editor in p["random_editors"] else []
        s = sum(per_step[editor] * (n + 1) + big * n_check + (down * n_down if r != "random" else 0) for r, n in runs)
        rows.append((editor, len(runs), s))
        total += s
    print(f"\nplan (profile {a.profile}, notebook 03): {p['n_cases']} hard + {p['n_cases']} normal steps per editor, "
          f"random run of {p['n_random']}, {n_check} checkpoints, downstream {n_down}x per run")
    print(f"{'editor':>10} {'runs':>5} {'hours':>7}")
    for editor, n, s in rows:
        print(f"{editor:>10} {n:>5} {s / 3600:7.2f}")
    print(f"{'total':>10} {'':>5} {total / 3600:7.2f}")


if __name__ == "__main__":
    main()
