"""`python -m editcollapse.cli.ship --profile local`: ship a profile's results with the repository.

Writes the rows of the results stores of `results/<profile>/` (`--results-dir`) to
`data/results/<profile>/` with their card (`shipped.ship`): complete sequential runs only.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .. import machine

from ..results import shipped
from ..paths import cli_path, in_repo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m editcollapse.cli.ship", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="the profile whose run is shipped (e.g. local)")
    ap.add_argument("--results-dir", type=cli_path, default=None, help="(default: the repository's results/<profile>)")
    ap.add_argument("--command", default=None, help="the command that made the rows, for the card "
                    "(default: make reproduce PROFILE=<profile>)")
    a = ap.parse_args(argv)
    card = shipped.ship(a.results_dir or in_repo(f"results/{a.profile}"), a.profile,
                        command=a.command or f"make reproduce PROFILE={shlex.quote(a.profile)}")
    print(f"shipped to {shipped.shipped_dir(a.profile)} on {machine.summary(card['machine'])}:")
    for name, entry in card["stores"].items():
        print(f"  {name}: {entry['rows']} rows")
    print(f"  complete sequential runs: {card['complete_sequential_runs']}")


if __name__ == "__main__":
    sys.exit(main())
