"""`python -m editcollapse.cli.hardedit`: the HardEdit pipeline (Butterfly Effect paper, Sec. 5) on one model:
pattern, generation (offline / local / endpoint), validation, filter, dataset in CounterFact format."""
from __future__ import annotations

import argparse
import json
import time

from .. import load_model
from ..hardcases.hardedit import filter_candidates, filter_yield, generate, write_hardedit
from ..hardcases.generate import generations_store
from ..hardcases.pattern import collapse_cases, hardcf_source, pattern, preferred
from ..hardcases.validate import validate, yield_table
from ..paths import atomic_write_text, cli_path, in_repo
from ..results.labels import COLLAPSE_THRESHOLD


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m editcollapse.cli.hardedit", description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None)
    p.add_argument("--hardcf", type=cli_path, default=None, help="HardCF source: a HardCF JSON or single-edit JSONL "
                   "(default: data/hardcf/<model>.json if present, else results/single_edit.jsonl)")
    p.add_argument("--offline-calls", type=int, default=20, help="offline generations of 10 samples")
    p.add_argument("--local-calls", type=int, default=0, help="generations by the local model (chat template)")
    p.add_argument("--endpoint-calls", type=int, default=0, help="calls to HARDEDIT_ENDPOINT")
    p.add_argument("--timeout", type=float, default=120.0, help="endpoint timeout, seconds")
    p.add_argument("--limit", type=int, default=None, help="edit at most this many candidates (guard order); "
                   "0 writes the dataset from the rows measured so far")
    p.add_argument("--reuse-candidates", action="store_true", help="take the candidates of the last run "
                   "(results/hardedit_candidates_<model>.json) instead of generating")
    p.add_argument("--ppl-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=cli_path, default=in_repo("results"),
                   help="(default: the repository's results/)")
    p.add_argument("--out", type=cli_path, default=None, help="dataset JSON (default <results-dir>/hardedit_<model>.json; "
                   "the shipped data/hardedit/ only when named)")
    a = p.parse_args(argv)

    t0 = time.time()
    lm = load_model(a.model, device=a.device)
    source = a.hardcf or hardcf_source(a.model, a.results_dir)
    hard = collapse_cases(source, model=a.model)
    table = pattern(lm, hard)
    print(f"HardCF source {source}: {len(hard)} collapse cases")
    print(table[table.feature != "relation"].to_string(index=False))
    cand_path = in_repo(a.results_dir) / f"hardedit_candidates_{a.model}.json"
    if a.reuse_candidates and cand_path.exists():
        candidates = json.loads(cand_path.read_text())
        print(f"{len(candidates)} candidates from {cand_path}")
    else:
        generations = generate(lm, hard, first_token="True" in preferred(table, "first_token"),
                               offline_calls=a.offline_calls, local_calls=a.local_calls,
                               endpoint_calls=a.endpoint_calls, timeout=a.timeout, seed=a.seed,
                               store=generations_store(a.results_dir, a.model))  # chat answers kept: a rerun resumes
        candidates, dropped = validate(generations, seed=a.seed)
        print(yield_table(generations, candidates, dropped).to_string(index=False))
        atomic_write_text(cand_path, json.dumps(candidates, indent=1, ensure_ascii=False))
    rows = filter_candidates(lm, candidates, a.results_dir, a.ppl_size, a.limit)
    meta = dict(model=a.model, settings=dict(editor="rome", ppl_size=a.ppl_size, seed=a.seed,
                                             threshold=COLLAPSE_THRESHOLD, ranker=rows.ranker.iloc[0]
                                             if len(rows) else "none"))
    out = write_hardedit(a.out or f"{a.results_dir}/hardedit_{a.model}.json", rows, candidates, meta)
    print(filter_yield(rows, candidates)[["edited", "collapsed"]].to_string())
    print(f"{len(candidates)} candidates, {len(rows)} edited, {len(out)} collapse cases kept "
          f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
