"""Perplexity throughput versus a bare forward pass over the same batches.

    .venv/bin/python bench/bench_perplexity.py [--model smollm2-135m] [--size 1000] [--limit N]

Both sides see the same length-sorted, right-padded batches. The bare side calls the model
on pre-encoded batches and keeps only the logits; the perplexity side is the full
`sentence_perplexities` (tokenization, forward, cross-entropy, exp). Throughput counts real
(unpadded) tokens. Each side runs `--repeats` times, alternating; the best wall and CPU times
are kept (the process CPU time is the steadier figure on a shared CPU).
Target: perplexity costs at most 1.3x the bare forward pass.
"""
from __future__ import annotations

import argparse
import time

import torch

from editcollapse import machine
from editcollapse.data import load_me_ppl
from editcollapse.models.loading import DEFAULT_MODEL, load_model
from editcollapse.eval.perplexity import sentence_perplexities
from editcollapse.models.tokens import length_sorted_batches


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds); on a shared CPU the CPU time is the steadier figure."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--size", type=int, default=1000, help="ME-PPL size: 50, 1000 or 10000")
    ap.add_argument("--limit", type=int, default=None, help="use the first LIMIT sentences only")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    lm = load_model(args.model, device=args.device)
    texts = load_me_ppl(args.size)[: args.limit]
    lengths = [len(lm.token_ids(t)) for t in texts]
    batches = [lm.encode([texts[i] for i in idx]) for idx in length_sorted_batches(lengths, args.batch_size)]
    n_tokens = sum(lengths)
    padded = sum(b["input_ids"].numel() for b in batches)

    @torch.inference_mode()
    def bare():
        for b in batches:
            lm.model(**b).logits

    def ppl():
        sentence_perplexities(lm, texts, batch_size=args.batch_size, progress=False)

    with torch.inference_mode():
        lm.model(**batches[-1])  # warm-up
    best = {"bare forward": (float("inf"),) * 2, "perplexity": (float("inf"),) * 2}
    for _ in range(args.repeats):
        for name, fn in (("bare forward", bare), ("perplexity", ppl)):
            best[name] = tuple(map(min, best[name], timed(fn, lm.device)))

    print(f"{args.model} on {lm.device} ({machine.summary()}), ME-PPL_{args.size}: {len(texts)} "
          f"sentences, {n_tokens} tokens ({padded} with padding), batch size {args.batch_size}")
    for name, (wall, cpu) in best.items():
        print(f"  {name:13s} wall {wall:8.2f} s {n_tokens / wall:9.1f} tokens/s   CPU {cpu:8.2f} s")
    (bw, bc), (pw, pc) = best["bare forward"], best["perplexity"]
    print(f"  ratio perplexity / bare forward: wall {pw / bw:.3f}, CPU {pc / bc:.3f} (target <= 1.3)")


if __name__ == "__main__":
    main()
