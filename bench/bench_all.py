"""`make bench`: one table of what the library costs, each figure a ratio or named with its machine.

    .venv/bin/python bench/bench_all.py [--model smollm2-135m] [--device cpu] [--edits 2] [--sweep 4]

Rows (all on one model, in one process, side by side):
- perplexity: ME-PPL_50 tokens/s, and its time over a bare forward pass of the same batches;
- key statistics C: tokens/s of `stats.second_moment` (uncached) over a bare forward pass of the
  same windows through the whole model;
- every registered editor: seconds per edit with its phases (keys, v*, update, ...) and undo;
- the collapse guard: milliseconds per case of the batched keys-only pass;
- sweep throughput (ROME + ME-PPL_50 edits per hour): one process with all threads against Ray
  with one worker per core, one thread each (Ray's start-up reported apart);
- peak memory: the process's resident set after each row (CUDA: peak allocated per row).
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from editcollapse import data, machine
from editcollapse.experiments.distributed import SingleEdit, ray_sweep
from editcollapse.editors import EDITORS, EditRequest, get_editor
from editcollapse.experiments.single import results_store, single_edit_sweep
from editcollapse.guard import key_features
from editcollapse.models.loading import DEFAULT_MODEL, load_model
from editcollapse.eval.perplexity import sentence_perplexities
from editcollapse.models.tokens import length_sorted_batches
from editcollapse.models.stats import _batches, corpus_windows, second_moment, take_tokens

ROWS: list[dict] = []


def peak_mb(device) -> float:
    if device.type == "cuda":
        mb = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        return mb
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def row(lm, what: str, figure: str, ratio: str = "") -> None:
    ROWS.append(dict(what=what, figure=figure, ratio=ratio, peak_mb=f"{peak_mb(lm.device):,.0f}"))
    print(f"  {what}: {figure} {ratio}", flush=True)


def bench_perplexity(lm):
    texts = data.load_me_ppl(50)
    lengths = [len(lm.token_ids(t)) for t in texts]
    batches = [lm.encode([texts[i] for i in idx]) for idx in length_sorted_batches(lengths, 16)]

    @torch.inference_mode()
    def bare():
        for b in batches:
            lm.model(**b)

    bare()  # warm-up
    t_bare, _ = timed(bare, lm.device)
    t_ppl, _ = timed(lambda: sentence_perplexities(lm, texts, batch_size=16, progress=False), lm.device)
    row(lm, "perplexity ME-PPL_50", f"{sum(lengths) / t_ppl:,.0f} tokens/s", f"{t_ppl / t_bare:.2f}x a bare forward")


def bench_stats(lm, n_tokens: int):
    layer = get_editor("rome").hparams_for(lm).layer
    ids, lengths = take_tokens(*corpus_windows(lm), n_tokens)

    @torch.inference_mode()
    def bare():
        for x, mask in _batches(lm, ids, lengths, 4096, desc="bare forward"):
            lm.model(input_ids=x, attention_mask=mask.long())

    t_bare, _ = timed(bare, lm.device)
    t_c, _ = timed(lambda: second_moment(lm, layer, n_tokens=n_tokens, use_cache=False), lm.device)
    row(lm, f"key statistics C (layer {layer}, {n_tokens:,} tokens)", f"{n_tokens / t_c:,.0f} tokens/s",
        f"{t_c / t_bare:.2f}x a bare forward of the whole model")


def bench_editors(lm, n: int):
    cases = data.load_counterfact(n=n, seed=1)
    for name in EDITORS:
        editor = get_editor(name)
        try:  # warm-up: C, checkpoints and caches are built once per model, not per edit
            editor.apply(lm, EditRequest.from_case(cases[0])).undo()
        except Exception as e:  # noqa: BLE001 - e.g. MEND without a trained checkpoint
            row(lm, f"edit {name}", f"not run: {type(e).__name__}: {str(e)[:80]}")
            continue
        seconds, undo = [], []
        for case in cases:
            result = editor.apply(lm, EditRequest.from_case(case))
            t, _ = timed(result.undo, lm.device)
            seconds.append(result.seconds)
            undo.append(t)
        phases = {k: sum(s.get(k, 0) for s in seconds) / n for k in seconds[0] if k != "total"}
        total = sum(s["total"] for s in seconds) / n
        split = ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
        row(lm, f"edit {name}", f"{total:.2f} s/edit ({split}); undo {1e3 * sum(undo) / n:.2f} ms")


def bench_guard(lm, n: int):
    cases = data.load_counterfact(n=n, seed=2)
    key_features(lm, cases[:4])  # warm-up
    t, _ = timed(lambda: key_features(lm, cases, batch_size=64), lm.device)
    row(lm, f"collapse guard ({n} cases, batched keys-only pass)", f"{1e3 * t / n:.1f} ms/case",
        f"{21_919 * t / n / 60:.1f} min for all of CounterFact")


def bench_sweep(lm, n: int, tmp: str):
    import ray

    cases = data.load_counterfact(n=n, seed=3)
    cores = os.cpu_count() or 1
    t_one, _ = timed(lambda: single_edit_sweep(lm, "rome", cases, results_store(tmp, "one"), ppl_size=50), lm.device)
    t_init, _ = timed(lambda: ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False), lm.device)
    try:
        job = SingleEdit("rome", experiment="single_edit", ppl_size=50)
        t_ray, _ = timed(lambda: ray_sweep(job, lm.spec.name, cases, results_store(tmp, "ray"), workers=cores,
                                           threads=1, device=str(lm.device), progress=False), lm.device)
    finally:
        ray.shutdown()
    row(lm, f"sweep, {n} ROME edits + ME-PPL_50", f"one process ({torch.get_num_threads()} threads) "
        f"{3600 * n / t_one:,.0f} edits/h; Ray {cores} workers x 1 thread {3600 * n / t_ray:,.0f} edits/h "
        f"(Ray start {t_init:.0f} s not counted)", f"Ray / one process {t_one / t_ray:.2f}x")


def main():
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default=None)
    ap.add_argument("--edits", type=int, default=2, help="edits timed per editor")
    ap.add_argument("--stats-tokens", type=int, default=20_000)
    ap.add_argument("--guard", type=int, default=256, help="cases scored by the guard")
    ap.add_argument("--sweep", type=int, default=4, help="cases of the sweep-throughput row (0: skip)")
    a = ap.parse_args()
    lm = load_model(a.model, device=a.device)
    where = machine.summary()
    print(f"# {a.model} on {lm.device} ({where}); load average {os.getloadavg()[0]:.1f}")
    bench_perplexity(lm)
    bench_stats(lm, a.stats_tokens)
    bench_editors(lm, a.edits)
    bench_guard(lm, a.guard)
    if a.sweep:
        with tempfile.TemporaryDirectory() as tmp:
            bench_sweep(lm, a.sweep, tmp)
    print(f"\n# {a.model} on {lm.device} ({where}); load average at the end {os.getloadavg()[0]:.1f}")
    print("| what | figure | ratio | peak memory MB |\n|---|---|---|---:|")
    for r in ROWS:
        print(f"| {r['what']} | {r['figure']} | {r['ratio']} | {r['peak_mb']} |")


if __name__ == "__main__":
    main()
