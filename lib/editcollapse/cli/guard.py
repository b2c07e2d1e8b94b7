"""`python -m editcollapse.cli.guard`: the screen, the labelled sweep, the guard's evaluation, the confirmation
edits and the HardCF of a model (`hardcases.hardcf.build`; docs/guard.md, data/hardcf/SOURCE.md)."""
from __future__ import annotations

import argparse
import sys

from ..hardcases.hardcf import EDIT_STORES, build
from ..models.loading import load_model
from ..paths import cli_path, in_repo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m editcollapse.cli.guard", description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", type=cli_path, default=in_repo("results"), help="(default: the repository's results/)")
    ap.add_argument("--edits", default="single_edit", choices=EDIT_STORES,
                    help="the store new edits go to (edits in any of them are reused)")
    ap.add_argument("--out", type=cli_path, default=None, help="where the HardCF JSON and summary go (default <results>/hardcf; "
                    "the shipped data/hardcf only when named; '' : nowhere)")
    ap.add_argument("--n-labelled", type=int, default=40, help="random CounterFact cases edited for calibration")
    ap.add_argument("--n-first", type=int, default=None, help="first-token cases edited for calibration (all)")
    ap.add_argument("--n-low", type=int, default=0,
                    help="the lowest-uᵀk^u cases of the screen (or of --low-from) edited for calibration")
    ap.add_argument("--low-from", default=None, help="screen experiment that --n-low picks from (this run's)")
    ap.add_argument("--n-random", type=int, default=80,
                    help="uniform sample (seed 0) whose rest-stratum cases are edited")
    ap.add_argument("--n-margin", type=int, default=20, help="highest-scoring cases below the threshold, all edited")
    ap.add_argument("--max-flagged", type=int, default=150)
    ap.add_argument("--max-confirm", type=int, default=None,
                    help="confirmation edits run now at most, in the guard's order (the rest stay unconfirmed)")
    ap.add_argument("--screen-n", type=int, default=None,
                    help="screen a seeded sample of this many cases only (no confirmation, no HardCF)")
    ap.add_argument("--no-screen", action="store_true", help="features of the edited cases only, no screen")
    ap.add_argument("--mom2", action="store_true", help="ROME with mom2_adjustment (C over --mom2-tokens tokens)")
    ap.add_argument("--mom2-tokens", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--screen-contexts", type=int, default=None, help="contexts behind k̄ in the screen (all)")
    args = vars(ap.parse_args(argv))
    model, device = args.pop("model"), args.pop("device")
    results = args.pop("results")
    if args["out"] is None:
        args["out"] = f"{results}/hardcf"
    build(load_model(model, device=device), results, **args)


if __name__ == "__main__":
    sys.exit(main())
