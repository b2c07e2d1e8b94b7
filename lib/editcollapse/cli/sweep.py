"""`python -m editcollapse.cli.sweep --editor rome --workers 2`: a single-edit sweep on Ray workers
(`experiments.distributed.ray_sweep`), into the results store."""
from __future__ import annotations

import argparse

from .. import data
from ..eval.perplexity import me_ppl
from ..experiments.distributed import SingleEdit, ray_sweep
from ..experiments.single import quick_sample, results_store
from ..models.loading import DEFAULT_MODEL, load_model
from ..paths import cli_path, in_repo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m editcollapse.cli.sweep",
                                 description="A single-edit sweep on Ray workers, into the results store.")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--editor", default="rome")
    ap.add_argument("--dataset", default="counterfact", choices=["counterfact", "zsre"])
    ap.add_argument("--n", type=int, default=None, help="random cases (default: all)")
    ap.add_argument("--first-token", type=int, default=0, help="plus this many subject-first-token cases")
    ap.add_argument("--ppl", type=int, default=50, help="ME-PPL size (50, 1000 or 10000)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (Ray CPUs) per worker")
    ap.add_argument("--gpus-per-worker", type=float, default=0)
    ap.add_argument("--address", default=None, help="an existing Ray cluster ('auto', 'ray://host:10001')")
    ap.add_argument("--results-dir", type=cli_path, default=in_repo("results"),
                    help="(default: the repository's results/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    lm = load_model(a.model, device="cpu")
    cases = (quick_sample(lm, a.dataset, a.n, a.first_token, a.seed) if a.n is not None or a.first_token
             else data.load_cases(a.dataset))
    original = me_ppl(lm, a.ppl, progress=False)["mean"]
    del lm
    job = SingleEdit(a.editor, experiment=f"single_edit_ppl{a.ppl}", ppl_size=a.ppl, ppl_original=original)
    n = ray_sweep(job, a.model, cases, results_store(a.results_dir, "single_edit"), workers=a.workers,
                  threads=a.threads, gpus_per_worker=a.gpus_per_worker, address=a.address)
    print(f"{n} rows written to {a.results_dir}/single_edit.jsonl")


if __name__ == "__main__":
    main()
