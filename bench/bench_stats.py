"""Cost and convergence of ROME's key statistics C = E[k kᵀ] (editcollapse.models.stats).

Prints (a) tokens/s of a bare full forward pass, of the forward pass stopped at the layer, and of
the statistics pass (stopped forward + float64 Σ k kᵀ) over the same tokens; (b) how C_n over the
first n tokens approaches C over the whole corpus: ‖C_n − C_all‖_F/‖C_all‖_F and cos(C_n⁻¹k, C_all⁻¹k)
for keys of CounterFact subjects; (c) the share of trace(C) from position 0 of the windows, and
how much leaving position 0 out (skip_first) turns C⁻¹k.

    .venv/bin/python bench/bench_stats.py --model smollm2-135m --layer 5
"""
import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from editcollapse import machine

from editcollapse.models import keys, stats
from editcollapse.data import load_counterfact
from editcollapse.models.loading import load_model
from editcollapse.models.nethook import Trace
from editcollapse.paths import atomic_write_text


def rate(fn, n_tokens: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n_tokens / (time.perf_counter() - t0)


def timing(lm, layer: int, seq_len: int, n_tokens: int, batch_tokens: int) -> None:
    ids, lengths = stats.take_tokens(*stats.corpus_windows(lm, "wikitext", seq_len), n_tokens)
    module = lm.spec.module("mlp_out", layer)

    def forward(stop: bool):
        for x, mask in stats._batches(lm, ids, lengths, batch_tokens, desc="forward"):
            with torch.no_grad():
                if stop:
                    with Trace(lm.model, module, retain_input=True, stop=True):
                        lm.model(input_ids=x, attention_mask=mask.long())
                else:
                    lm.model(input_ids=x, attention_mask=mask.long())

    def statistics():
        with tempfile.TemporaryDirectory() as d:
            os.environ["EDITCOLLAPSE_CACHE"] = d
            stats.second_moment(lm, layer, n_tokens, seq_len=seq_len, batch_tokens=batch_tokens)
            del os.environ["EDITCOLLAPSE_CACHE"]

    forward(True)  # warm-up
    full, stopped, stat = rate(lambda: forward(False), n_tokens), rate(lambda: forward(True), n_tokens), \
        rate(statistics, n_tokens)
    print(f"\n(a) cost over {n_tokens} tokens (seq_len {seq_len}, {lm.device}; {machine.summary()})")
    print(f"  full forward pass          {full:9.0f} tok/s")
    print(f"  forward stopped at {module}  {stopped:9.0f} tok/s")
    print(f"  statistics (stopped + Σkkᵀ) {stat:9.0f} tok/s")
    print(f"  time of the statistics / time of a full forward = {full / stat:.3f}; "
          f"Σkkᵀ adds {stopped / stat - 1:.1%} to the stopped forward")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-tokens", type=int, default=stats.DEFAULT_BATCH_TOKENS)
    ap.add_argument("--time-tokens", type=int, default=16384)
    ap.add_argument("--sizes", default="10000,20000,50000,100000,150000,200000")
    ap.add_argument("--n-keys", type=int, default=20)
    ap.add_argument("--share-seq-lens", default="256,1024")
    ap.add_argument("--share-tokens", type=int, default=50_000)
    ap.add_argument("--csv", help="write the convergence table (one row per n and key) here")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: a,b,c")
    args = ap.parse_args()
    lm = load_model(args.model)
    seq_len = stats.resolve_seq_len(lm, args.seq_len)
    skip = set(args.skip.split(","))

    if "a" not in skip:
        timing(lm, args.layer, seq_len, args.time_tokens, args.batch_tokens)

    subject_keys = keys.subject_keys(lm, args.layer, load_counterfact("edit", n=args.n_keys, seed=0))
    if "b" not in skip:
        df = stats.convergence(lm, args.layer, [int(s) for s in args.sizes.split(",")], subject_keys, seq_len=seq_len,
                               batch_tokens=args.batch_tokens)
        if args.csv:
            atomic_write_text(args.csv, df.to_csv(index=False))
        table = df.groupby("n_tokens").agg(rel_fro_err=("rel_fro_err", "first"), cos_mean=("cos", "mean"),
                                           cos_min=("cos", "min"), rel_fro_err_rest=("rel_fro_err_rest", "first"),
                                           cos_rest_mean=("cos_rest", "mean"), cos_rest_min=("cos_rest", "min"))
        N = table.index.max()
        nested = table.cos_mean.iloc[:-1]
        c = float(((1 - nested) / (1 / nested.index - 1 / N)).median())  # 1 − cos ≈ c (1/n − 1/N) for nested sets
        table["cos_vs_limit_fit"] = 1 - c / table.index
        print(f"\n(b) convergence, {args.model} layer {args.layer}, seq_len {seq_len}, {len(subject_keys)} CounterFact "
              f"subject keys; C_all = last row, 'rest' = the other N − n tokens (disjoint)")
        print(table.to_string(float_format=lambda v: f"{v:.4f}"))
        print(f"    fit 1 − cos(C_n⁻¹k, C_all⁻¹k) ≈ c (1/n − 1/N): c = {c:.0f} tokens, so against the "
              f"corpus limit 1 − cos ≈ c/n (column cos_vs_limit_fit); for two disjoint halves 4c/N = {4 * c / N:.4f}")

    if "c" not in skip:
        layers = list(range(lm.n_layers))
        for T in [int(s) for s in args.share_seq_lens.split(",")]:
            share = stats.first_token_share(lm, layers, args.share_tokens, seq_len=T, batch_tokens=args.batch_tokens)
            print(f"\n(c) share of trace(C) from position 0, {args.share_tokens} tokens, seq_len {T}")
            print(share.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        m = stats.second_moment(lm, args.layer, seq_len=seq_len, batch_tokens=args.batch_tokens)
        m0 = stats.second_moment(lm, args.layer, seq_len=seq_len, batch_tokens=args.batch_tokens, skip_first=True)
        cos = F.cosine_similarity(m.inv_apply(subject_keys), m0.inv_apply(subject_keys), dim=-1)
        frac = 1 - m0.count * m0.C.trace() / (m.count * m.C.trace())
        print(f"\n    layer {args.layer}, {m.count} tokens, seq_len {seq_len}: position 0 = "
              f"{(m.count - m0.count) / m.count:.4%} of keys, {frac:.4%} of trace(C); "
              f"cos(C⁻¹k, C_skip0⁻¹k) mean {cos.mean():.6f}, min {cos.min():.6f}")


if __name__ == "__main__":
    main()
