"""Run the notebooks headless with papermill: ``python -m editcollapse.reproduce --profile quick``.

Each ``notebooks/0*.ipynb`` runs in name order in the interpreter that runs this module (kernel
``python3``, which jupyter_client starts as ``sys.executable``), with ``notebooks/`` as working
directory, as in JupyterLab. Parameters come from ``notebooks/params/<profile>.yaml``: the ``common``
section, then the section named after the notebook (e.g. ``01_pilot_observation``), then
``--set key=value`` overrides (values parsed as YAML). ``common`` and ``--set`` keys go to the
notebooks whose ``parameters`` cell declares them. Executed copies go to ``notebooks/executed/<profile>/``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import papermill
import yaml

from .paths import REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
KERNEL = "python3"


class NotebookError(RuntimeError):
    """A notebook failed, or the parameters given to it do not fit its parameters cell."""


def load_profile(name: str, notebooks_dir: Path = NOTEBOOKS_DIR) -> dict:
    """``notebooks/params/<name>.yaml`` as {section: {parameter: value}}; it must have a ``common`` section."""
    params_dir = notebooks_dir / "params"
    path = params_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in params_dir.glob("*.yaml"))
        raise ValueError(f"unknown profile {name!r}: no {path} (profiles: {known})")
    profile = yaml.safe_load(path.read_text())
    if not isinstance(profile, dict) or "common" not in profile:
        raise ValueError(f"{path}: expected a mapping with a 'common' section")
    for section, values in profile.items():
        if not isinstance(values, dict):
            raise ValueError(f"{path}: section {section!r} must map parameter names to values, got {values!r}")
    return profile


def parse_overrides(items: list[str]) -> dict:
    """``["n_cases=5", "editors=[rome]"]`` -> {"n_cases": 5, "editors": ["rome"]} (values parsed as YAML)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--set expects key=value with a Python name as key, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def notebook_parameters(profile: dict, stem: str, declared: set[str], overrides: dict) -> dict:
    """Parameters of notebook ``stem``: common < its own section < overrides, where common and overrides
    count only for the names its parameters cell ``declared``, and its own section may set no other name."""
    section = profile.get(stem, {})
    unknown = sorted(set(section) - declared)
    if unknown:
        raise NotebookError(f"params section {stem!r} sets {unknown}, which the parameters cell of {stem}.ipynb "
                            f"does not declare (it declares {sorted(declared)})")
    return {
        **{k: v for k, v in profile["common"].items() if k in declared},
        **section,
        **{k: v for k, v in overrides.items() if k in declared},
    }


def find_notebooks(only: list[str] | None = None, notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """``0*.ipynb`` in name order; ``only=["01", "02"]`` keeps the notebooks named "01" or "01_...", "02"..."""
    notebooks = sorted(notebooks_dir.glob("0*.ipynb"))
    if not notebooks:
        raise NotebookError(f"no notebooks match {notebooks_dir}/0*.ipynb")
    if not only:
        return notebooks

    def picked(stem: str, key: str) -> bool:
        return stem == key or stem.startswith(f"{key}_")

    missing = [key for key in only if not any(picked(p.stem, key) for p in notebooks)]
    if missing:
        raise ValueError(f"--only {missing}: no such notebook (notebooks: {[p.stem for p in notebooks]})")
    return [p for p in notebooks if any(picked(p.stem, key) for key in only)]


def run(profile_name: str, only: list[str] | None = None, overrides: dict | None = None,
        notebooks_dir: Path = NOTEBOOKS_DIR, executed_dir: Path | None = None) -> list[tuple[str, float]]:
    """Execute the selected notebooks in order; returns [(notebook stem, wall seconds)].
    Stops at the first failure with a NotebookError naming the notebook."""
    profile = load_profile(profile_name, notebooks_dir)
    overrides = overrides or {}
    declared = {p.stem: set(papermill.inspect_notebook(str(p))) for p in find_notebooks(None, notebooks_dir)}
    notebooks = find_notebooks(only, notebooks_dir)
    for kind, keys, stems in (("common", profile["common"], list(declared)),
                              ("--set", overrides, [p.stem for p in notebooks])):
        unused = sorted(k for k in keys if not any(k in declared[stem] for stem in stems))
        if unused:
            raise NotebookError(f"{kind} parameters {unused} are declared by no parameters cell of {stems}")
    params = {p.stem: notebook_parameters(profile, p.stem, declared[p.stem], overrides) for p in notebooks}
    out_dir = executed_dir or notebooks_dir / "executed" / profile_name
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = []
    for i, path in enumerate(notebooks, 1):
        out = out_dir / path.name
        print(f"[{i}/{len(notebooks)}] {path.stem} {params[path.stem]}", flush=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(str(path), str(out), parameters=params[path.stem], kernel_name=KERNEL,
                                       cwd=str(notebooks_dir), start_timeout=180)
        except papermill.PapermillExecutionError as err:
            raise NotebookError(f"notebook {path.stem} failed at cell [{err.exec_count}] after "
                                f"{time.perf_counter() - start:.1f} s: {err.ename}: {err.evalue}\n"
                                f"traceback in the executed copy: {out}") from err
        except Exception as err:  # a dead kernel, a kernel that did not start, a timeout
            raise NotebookError(f"notebook {path.stem} failed: {type(err).__name__}: {err}") from err
        timings.append((path.stem, time.perf_counter() - start))
        print(f"[{i}/{len(notebooks)}] {path.stem} done in {timings[-1][1]:.1f} s -> {out}", flush=True)
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m editcollapse.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick", help="notebooks/params/<profile>.yaml (quick | paper)")
    parser.add_argument("--only", type=lambda s: [x for x in s.split(",") if x],
                        help="comma-separated notebook numbers or names, e.g. 01,02")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter (YAML value), e.g. --set model=llama2-7b; repeatable")
    args = parser.parse_args(argv)
    try:
        timings = run(args.profile, args.only, parse_overrides(args.overrides))
    except (NotebookError, ValueError) as err:
        sys.exit(f"reproduce: {err}")
    width = max(len(stem) for stem, _ in timings)
    print(f"\nprofile {args.profile}: wall time per notebook")
    for stem, seconds in timings:
        print(f"  {stem:<{width}}  {seconds:8.1f} s")
    print(f"  {'total':<{width}}  {sum(s for _, s in timings):8.1f} s")


if __name__ == "__main__":
    main()
