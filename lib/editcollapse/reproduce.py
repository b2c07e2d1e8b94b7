"""Run the notebooks headless with papermill: ``python -m editcollapse.cli.reproduce --profile quick``.

Each ``notebooks/0*.ipynb`` runs in name order in the interpreter that runs this module (kernel
``python3``, which jupyter_client starts as ``sys.executable``), with ``notebooks/`` as working
directory, as in JupyterLab. Parameters come from ``notebooks/params/<profile>.yaml``: the ``common``
section, then the section named after the notebook (e.g. ``01_pilot_observation``), then
``--set key=value`` overrides (values parsed as YAML; one ``--set`` may hold several pairs separated by
spaces, ``--set "n_zsre=2 editors=[rome, c-rome]"``; a parameter set twice is refused). ``common`` and
``--set`` keys go to the notebooks whose ``parameters`` cell declares them. A profile is the name of a file
in ``notebooks/params/``, never a path. Before any notebook starts, every parameter of every selected
notebook is checked against its schema (`params.parameter_schema`: type, range, choices such as the editors,
models, devices and ME-PPL sizes that exist); a parameter without one (a notebook outside this repository)
must have a type it has in the profiles or the parameters cells. Executed copies go to
``notebooks/executed/<profile>/``.

Progress: in the kernel, ``tqdm.auto`` bars are text on stderr (not widgets), which the runner copies to
its own stderr as they come; they are then removed from the executed copy, which keeps only the
notebook's own output.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from unittest.mock import patch

import nbformat
import papermill
import yaml

from .params import check_types, check_values, parameter_examples, parameter_schema
from .paths import REPO_ROOT, atomic_write_text, in_repo
from .results import shipped

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
KERNEL = "python3"


class NotebookError(RuntimeError):
    """A notebook failed, or the parameters given to it do not fit its parameters cell."""


def load_profile(name: str, notebooks_dir: Path = NOTEBOOKS_DIR) -> dict:
    """``notebooks/params/<name>.yaml`` as {section: {parameter: value}}; it must have a ``common`` section.
    `name` is one of the files' names (``quick``), never a path."""
    params_dir = notebooks_dir / "params"
    known = sorted(p.stem for p in params_dir.glob("*.yaml"))
    if name not in known:
        raise ValueError(f"unknown profile {name!r}: a profile is the name of a file {params_dir}/<name>.yaml, "
                         f"not a path (profiles: {known})")
    path = params_dir / f"{name}.yaml"
    profile = yaml.safe_load(path.read_text())
    if not isinstance(profile, dict) or "common" not in profile:
        raise ValueError(f"{path}: expected a mapping with a 'common' section")
    for section, values in profile.items():
        if not isinstance(values, dict):
            raise ValueError(f"{path}: section {section!r} must map parameter names to values, got {values!r}")
    return profile


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
    if only is None:
        return notebooks
    if isinstance(only, str) or not only:
        raise ValueError(f"only must be a non-empty list of notebook numbers or names, not {only!r} (None: all)")

    def picked(stem: str, key: str) -> bool:
        return stem == key or stem.startswith(f"{key}_")

    missing = [key for key in only if not any(picked(p.stem, key) for p in notebooks)]
    if missing:
        raise ValueError(f"--only {missing}: no such notebook (notebooks: {[p.stem for p in notebooks]})")
    return [p for p in notebooks if any(picked(p.stem, key) for key in only)]


# tqdm (a tqdm progress line): "[elapsed<remaining, rate]" or "[elapsed, rate]"
PROGRESS_LINE = re.compile(r"\[\d+:\d\d(:\d\d)?(<|,|\])")
CURSOR_MOVE = re.compile(r"\x1b\[\d*[ABCDK]")  # what tqdm writes to place nested bars; colours stay
# Run in the kernel at start (in a namespace of its own): tqdm.auto bars as text on stderr, at most one update
# a second, so that they reach the runner's stderr and strip_progress can remove them from the saved copy.
KERNEL_SETUP = """
import os, warnings
os.environ.setdefault("TQDM_MININTERVAL", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import tqdm.asyncio, tqdm.auto, tqdm.autonotebook
tqdm.auto.tqdm = tqdm.autonotebook.tqdm = tqdm.asyncio.tqdm
tqdm.auto.trange = tqdm.autonotebook.trange = tqdm.asyncio.trange
"""


def strip_progress(nb) -> int:
    """Remove progress bars from an executed notebook: tqdm lines in stderr streams (what a terminal would
    show last on each line), the cursor moves of nested bars, and tqdm widgets. Returns the number of
    outputs changed or removed."""
    changed = 0
    for cell in nb.cells:
        kept = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stderr":
                shown = [line.split("\r")[-1] for line in CURSOR_MOVE.sub("", out.text).split("\n")]
                text = "\n".join(line for line in shown if not PROGRESS_LINE.search(line)).lstrip("\n")
                if text != out.text:
                    changed += 1
                    if not text.strip():
                        continue
                    out.text = text
            elif (out.output_type == "display_data" and "application/vnd.jupyter.widget-view+json" in out.data
                  and PROGRESS_LINE.search(str(out.data.get("text/plain", "")))):
                changed += 1
                continue
            kept.append(out)
        if "outputs" in cell:
            cell.outputs = kept
    return changed


def _strip_file(path: Path) -> None:
    if path.exists():
        nb = nbformat.read(path, as_version=4)
        if strip_progress(nb):
            atomic_write_text(path, nbformat.writes(nb))


def check_machine(params: dict[str, dict]) -> None:
    """Refuse, before any notebook starts, a profile this machine cannot run: CUDA asked for and absent,
    or a model whose weights cannot be found (`models.loading.check_available`)."""
    import torch

    from .models.loading import ModelLoadError, check_available

    cuda = sorted(stem for stem, p in params.items() if str(p.get("device", "")).startswith("cuda"))
    if cuda and not torch.cuda.is_available():
        raise NotebookError(f"notebooks {cuda} ask for device=cuda, and this machine has no CUDA device (torch "
                            f"{torch.__version__}). The paper profile needs one GPU (80 GB for GPT-J-6B and Llama-2-7b); "
                            "on a CPU run PROFILE=quick")
    for name in sorted({p["model"] for p in params.values() if "model" in p}):
        try:
            check_available(name)
        except ModelLoadError as e:
            raise NotebookError(str(e)) from None


def mend_models(params: dict[str, dict]) -> list[str]:
    """The models on which some notebook edits with MEND (its `editors` or `random_editors`)."""
    return sorted({p["model"] for p in params.values()
                   if "model" in p and "mend" in [*(p.get("editors") or []), *(p.get("random_editors") or [])]})


def train_missing_mend(params: dict[str, dict], profile_name: str) -> list[tuple[str, float]]:
    """MEND edits only once it is trained: before the first notebook, train and save the checkpoint of each
    model that misses one, as `make train-mend MODEL=... PROFILE=...` does (`mend.train_and_save`).
    Returns [("train-mend <model>", wall seconds)]."""
    from .editors import mend
    from .models.loading import load_model

    todo = [m for m in mend_models(params) if not mend.has_checkpoint(m)]
    timings = []
    for model in todo:
        start = time.perf_counter()
        print(f"MEND has no checkpoint for {model} at {mend.checkpoint_dir(model)}: training it first, as "
              f"`make train-mend MODEL={model} PROFILE={profile_name}` does", flush=True)
        lm = load_model(model, device=next(p.get("device") for p in params.values() if p.get("model") == model))
        _, folder = mend.train_and_save(lm, profile_name)
        del lm
        timings.append((f"train-mend {model}", time.perf_counter() - start))
        print(f"saved {folder} in {timings[-1][1]:.1f} s", flush=True)
    return timings


def prepare(profile_name: str, only: list[str] | None = None, overrides: dict | None = None,
            notebooks_dir: Path = NOTEBOOKS_DIR) -> tuple[list[Path], dict[str, dict]]:
    """The selected notebooks and {notebook: parameters}, after every check that needs no machine: the
    profile, the selection, the parameters' names, and each value against its parameter's schema."""
    profile = load_profile(profile_name, notebooks_dir)
    overrides = overrides or {}
    defaults = {p.stem: papermill.inspect_notebook(str(p)) for p in find_notebooks(None, notebooks_dir)}
    declared = {stem: set(params) for stem, params in defaults.items()}
    notebooks = find_notebooks(only, notebooks_dir)
    schema = parameter_schema()
    check_types({k: v for k, v in overrides.items() if k not in schema}, parameter_examples(notebooks_dir, defaults))
    for kind, keys, stems in (("common", profile["common"], list(declared)),
                              ("--set", overrides, [p.stem for p in notebooks])):
        unused = sorted(k for k in keys if not any(k in declared[stem] for stem in stems))
        if unused:
            raise NotebookError(f"{kind} parameters {unused} are declared by no parameters cell of {stems}")
    params = {p.stem: notebook_parameters(profile, p.stem, declared[p.stem], overrides) for p in notebooks}
    check_values(params, overrides, profile_name, schema)
    return notebooks, params


def run(profile_name: str, only: list[str] | None = None, overrides: dict | None = None,
        notebooks_dir: Path = NOTEBOOKS_DIR, executed_dir: Path | None = None,
        recompute: bool = False) -> list[tuple[str, float]]:
    """Execute the selected notebooks in order; returns [(notebook stem, wall seconds)].
    Everything is checked before the first notebook starts (`prepare`, `check_machine`). Then, unless
    `recompute`, the rows shipped for the profile (`shipped.seed`) go into its results folders, so the
    notebooks compute only what they lack. Each notebook's wall time goes to its results folder's
    `shipped.SECONDS_FILE`. Figures go to figures/ for the quick profile, to figures/<profile>/ for another
    (unless EDITCOLLAPSE_FIGURES says). Stops at the first failure with a NotebookError naming the notebook."""
    notebooks, params = prepare(profile_name, only, overrides, notebooks_dir)
    check_machine(params)
    results_dirs = sorted({p["results_dir"] for p in params.values() if "results_dir" in p})
    if not recompute:
        for folder in results_dirs:
            added = shipped.seed(profile_name, folder)
            if added:
                print(f"shipped rows of profile {profile_name} put in {folder}: {added}", flush=True)
    out_dir = executed_dir or notebooks_dir / "executed" / profile_name
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = train_missing_mend(params, profile_name)
    # the quick tour's figures are figures/*.png; another profile's go to a folder of its own (for the kernels)
    figures = {} if profile_name == "quick" or "EDITCOLLAPSE_FIGURES" in os.environ else \
        {"EDITCOLLAPSE_FIGURES": str(REPO_ROOT / "figures" / profile_name)}
    with patch.dict(os.environ, figures):
        _execute(notebooks, params, out_dir, notebooks_dir, timings)
    return timings


def _execute(notebooks: list[Path], params: dict[str, dict], out_dir: Path, notebooks_dir: Path,
             timings: list[tuple[str, float]]) -> None:
    """Run each notebook with papermill into `out_dir`, appending (stem, seconds) to `timings`."""
    for i, path in enumerate(notebooks, 1):
        out = out_dir / path.name
        print(f"[{i}/{len(notebooks)}] {path.stem} {params[path.stem]}", flush=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(str(path), str(out), parameters=params[path.stem], kernel_name=KERNEL,
                                       cwd=str(notebooks_dir), start_timeout=180, progress_bar=False,
                                       stderr_file=sys.stderr,
                                       extra_arguments=[f"--IPKernelApp.exec_lines=exec({KERNEL_SETUP!r}, {{}})"])
        except papermill.PapermillExecutionError as err:
            raise NotebookError(f"notebook {path.stem} failed at cell [{err.exec_count}] after "
                                f"{time.perf_counter() - start:.1f} s: {err.ename}: {err.evalue}\n"
                                f"traceback in the executed copy: {out}") from err
        except Exception as err:  # a dead kernel, a kernel that did not start, a timeout
            raise NotebookError(f"notebook {path.stem} failed: {type(err).__name__}: {err}") from err
        finally:
            _strip_file(out)
        timings.append((path.stem, time.perf_counter() - start))
        if "results_dir" in params[path.stem]:
            _record_seconds(in_repo(params[path.stem]["results_dir"]) / shipped.SECONDS_FILE, path.stem, timings[-1][1])
        print(f"[{i}/{len(notebooks)}] {path.stem} done in {timings[-1][1]:.1f} s -> {out}", flush=True)


def _record_seconds(path: Path, stem: str, seconds: float) -> None:
    """{notebook: wall seconds of its last run} in `path`, this notebook's entry replaced."""
    seconds_by = json.loads(path.read_text()) if path.exists() else {}
    atomic_write_text(path, json.dumps({**seconds_by, stem: round(seconds, 1)}, indent=1))


if __name__ == "__main__":  # the old command: say where it went instead of exiting 0 having run nothing
    raise SystemExit("the command line moved: python -m editcollapse.cli.reproduce (or make reproduce)")
