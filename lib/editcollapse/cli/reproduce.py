"""`python -m editcollapse.cli.reproduce --profile quick`: run the notebooks headless (`reproduce.run`),
then print each notebook's wall time."""
from __future__ import annotations

import argparse
import re
import sys

from .. import reproduce
from ..params import parse_overrides


def parse_only(text: str) -> list[str]:
    """``"01, 02"`` / ``"01,02"`` / ``"01 02"`` -> ``["01", "02"]``; an empty selection is an error."""
    only = [x for x in re.split(r"[,\s]+", text) if x]
    if not only:
        raise ValueError(f"--only needs notebook numbers or names, e.g. 01,02 (got {text!r}); leave it out to run all")
    return only


def _only_arg(text: str) -> list[str]:
    try:
        return parse_only(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m editcollapse.cli.reproduce", description=reproduce.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick",
                        help="a profile name: notebooks/params/<profile>.yaml (quick | paper), never a path")
    parser.add_argument("--only", type=_only_arg,
                        help="notebook numbers or names separated by commas or spaces, e.g. 01,02")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override parameters (YAML values), e.g. --set model=llama2-7b or "
                             "--set \"n_zsre=2 editors=[rome, c-rome]\"; repeatable")
    parser.add_argument("--recompute", action="store_true",
                        help="do not start from the rows shipped for the profile (data/results/<profile>/)")
    args = parser.parse_args(argv)
    try:
        timings = reproduce.run(args.profile, args.only, parse_overrides(args.overrides), recompute=args.recompute)
    except (reproduce.NotebookError, ValueError) as err:
        sys.exit(f"reproduce: {err}")
    width = max(len(stem) for stem, _ in timings)
    print(f"\nprofile {args.profile}: wall time per notebook")
    for stem, seconds in timings:
        print(f"  {stem:<{width}}  {seconds:8.1f} s")
    print(f"  {'total':<{width}}  {sum(s for _, s in timings):8.1f} s")


if __name__ == "__main__":
    main()
