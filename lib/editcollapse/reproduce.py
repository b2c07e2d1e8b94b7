"""Run the notebooks headless with papermill: ``python -m editcollapse.reproduce --profile quick``.

Each ``notebooks/0*.ipynb`` runs in name order in the interpreter that runs this module (kernel
``python3``, which jupyter_client starts as ``sys.executable``), with ``notebooks/`` as working
directory, as in JupyterLab. Parameters come from ``notebooks/params/<profile>.yaml``: the ``common``
section, then the section named after the notebook (e.g. ``01_pilot_observation``), then
``--set key=value`` overrides (values parsed as YAML; one ``--set`` may hold several pairs separated by
spaces, ``--set "n_zsre=2 editors=[rome, c-rome]"``; a parameter set twice is refused). ``common`` and
``--set`` keys go to the notebooks whose ``parameters`` cell declares them. A profile is the name of a file
in ``notebooks/params/``, never a path. Before any notebook starts, every parameter of every selected
notebook is checked against its schema (`parameter_schema`: type, range, choices such as the editors,
models, devices and ME-PPL sizes that exist); a parameter without one (a notebook outside this repository)
must have a type it has in the profiles or the parameters cells. Executed copies go to
``notebooks/executed/<profile>/``.

Progress: in the kernel, ``tqdm.auto`` bars are text on stderr (not widgets), which the runner copies to
its own stderr as they come; they are then removed from the executed copy, which keeps only the
notebook's own output.
"""
from __future__ import annotations

import argparse
import ast
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest.mock import patch

import nbformat
import papermill
import yaml

from .results import shipped
from .paths import REPO_ROOT, atomic_write_text, in_repo

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


def split_assignments(text: str) -> list[str]:
    """``"n=5 editors=[rome, c-rome]"`` -> ``["n=5", "editors=[rome, c-rome]"]``: splits at whitespace that is
    outside brackets and quotes and followed by ``name=``; other whitespace belongs to the value."""
    parts, start, depth, quote = [], 0, 0, None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"" and text[:i].rstrip()[-1:] in ("", "=", "[", "{", ",", ":"):  # a YAML quoted scalar starts
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch.isspace() and depth <= 0 and re.match(r"\s+[A-Za-z_]\w*=", text[i:]):
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in parts + [text[start:]] if p.strip()]


def parse_overrides(items: list[str]) -> dict:
    """``["n_cases=5 editors=[rome, c-rome]"]`` -> {"n_cases": 5, "editors": ["rome", "c-rome"]} (YAML values).
    A key given twice (in one ``--set`` or two) is an error."""
    overrides, given = {}, {}
    for item in items:
        for pair in split_assignments(item):
            key, sep, value = pair.partition("=")
            if not sep or not key.isidentifier():
                raise ValueError(f"--set expects key=value with a Python name as key, got {pair!r}")
            if key in given:
                raise ValueError(f"--set {key} is given twice ({given[key]}, then {pair}): set each parameter once")
            given[key] = pair
            try:
                overrides[key] = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ValueError(f"--set {key}: {value!r} is not a YAML value ({err})".replace("\n", " ")) from None
    return overrides


def parse_only(text: str) -> list[str]:
    """``"01, 02"`` / ``"01,02"`` / ``"01 02"`` -> ``["01", "02"]``; an empty selection is an error."""
    only = [x for x in re.split(r"[,\s]+", text) if x]
    if not only:
        raise ValueError(f"--only needs notebook numbers or names, e.g. 01,02 (got {text!r}); leave it out to run all")
    return only


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def parameter_examples(notebooks_dir: Path, defaults: dict[str, dict]) -> dict[str, list]:
    """{parameter: values it takes in any profile (``params/*.yaml``) or as a parameters-cell default}."""
    examples: dict[str, list] = {}
    for path in sorted((notebooks_dir / "params").glob("*.yaml")):
        for section in (yaml.safe_load(path.read_text()) or {}).values():
            for key, value in (section or {}).items():
                examples.setdefault(key, []).append(value)
    for params in defaults.values():
        for key, info in params.items():
            try:
                examples.setdefault(key, []).append(ast.literal_eval(info["default"]))
            except (ValueError, SyntaxError):  # an expression, not a literal: no type to compare with
                pass
    return examples


def check_types(overrides: dict, examples: dict[str, list]) -> None:
    """Refuse an override whose type (or list-element type) is none of those its parameter has elsewhere;
    an int is accepted where a float is."""
    def fits(value, kinds: set) -> bool:
        return _kind(value) in kinds or (_kind(value) == "int" and "float" in kinds)

    for key, value in overrides.items():
        known = examples.get(key, [])
        kinds = {_kind(v) for v in known}
        items = {_kind(x) for v in known if isinstance(v, list) for x in v}
        if kinds and not fits(value, kinds):
            raise ValueError(f"--set {key}={value!r}: parameter {key!r} expects {' or '.join(sorted(kinds))} "
                             f"(its values in the profiles and the parameters cells: {known}), "
                             f"got the {_kind(value)} {value!r}")
        if isinstance(value, list) and items and not all(fits(x, items) for x in value):
            raise ValueError(f"--set {key}={value!r}: parameter {key!r} expects a list of "
                             f"{' or '.join(sorted(items))} (as in {known}), got {value!r}")


# ---------------------------------------------------------------- what each parameter accepts
# A check takes a value and returns None when it fits, else what the parameter must be ("must be ...").
Check = Callable[[object], str | None]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _int_from(low: int, null: str = "") -> Check:
    """An int >= low; with `null` (what null means), also null."""
    def check(value):
        if (value is None and null) or (_is_int(value) and value >= low):
            return None
        return f"must be an int >= {low}" + (f" or null ({null})" if null else "")
    return check


def _one_of(choices, what: str, null: str = "") -> Check:
    """One of `choices` (of their type: 50.0 is not the int 50); with `null`, also null."""
    def check(value):
        if (value is None and null) or any(type(value) is type(c) and value == c for c in choices):
            return None
        return f"must be {what}, one of {', '.join(map(str, choices))}" + (f", or null ({null})" if null else "")
    return check


def _names(choices, what: str, empty: bool = True) -> Check:
    """A list of distinct names among `choices` (non-empty unless `empty`)."""
    def check(value):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            return f"must be a list of {what} names ({', '.join(choices)})"
        unknown = [x for x in value if x not in choices]
        if unknown:
            return f"lists unknown {what} names {unknown} (known: {', '.join(choices)})"
        twice = sorted({x for x in value if value.count(x) > 1})
        if twice:
            return f"must list each {what} once, and lists {twice} more than once"
        if not value and not empty:
            return f"must list at least one {what} ({', '.join(choices)})"
        return None
    return check


def _device(value):
    if value is None or (isinstance(value, str) and re.fullmatch(r"cpu|mps|cuda(:\d+)?", value)):
        return None
    return "must be cpu, cuda, cuda:<index>, mps, or null (CUDA when present)"


def _text(what: str) -> Check:
    def check(value):
        return None if isinstance(value, str) and value.strip() else f"must be {what} (a non-empty string)"
    return check


def _model_path(value):
    """A path in which ``{model}`` may stand for the model's name (the notebook calls ``.format(model=...)``)."""
    try:
        ok = isinstance(value, str) and bool(value.strip()) and bool(value.format(model="m"))
    except (AttributeError, KeyError, IndexError, ValueError):
        ok = False
    return None if ok else "must be a path (a non-empty string), in which only {model} may stand in braces"


def _flag_or_null(value):
    return None if value is None or isinstance(value, bool) else "must be true, false or null"


def _flag(value):
    return None if isinstance(value, bool) else "must be true or false"


def _number_above(low: float) -> Check:
    def check(value):
        return None if _is_number(value) and value > low else f"must be a number > {low:g}"
    return check


def _shares(value):
    if isinstance(value, list) and value and all(_is_number(x) and 0 <= x <= 1 for x in value):
        return None
    return "must be a non-empty list of numbers between 0 and 1"


def _lengths(value):
    if (isinstance(value, list) and value and all(_is_int(x) and x >= 1 for x in value)
            and len(set(value)) == len(value)):
        return None
    return "must be a non-empty list of distinct ints >= 1"


def _items_per_task(tasks) -> Check:
    def check(value):
        if value is None or (_is_int(value) and value >= 1):
            return None
        if (isinstance(value, dict) and value and all(k in tasks for k in value)
                and all(_is_int(n) and n >= 1 for n in value.values())):
            return None
        return (f"must be an int >= 1, a mapping {{task: int >= 1}} over the tasks {', '.join(tasks)}, "
                "or null (the full sets)")
    return check


@functools.cache
def parameter_schema() -> dict[str, Check]:
    """{parameter: its check}, for every parameter of notebooks/0*.ipynb (a notebook's schema is the checks
    of the names its parameters cell declares). Editors, models, tasks and ME-PPL sizes are those that exist."""
    from .data import ME_PPL_FILES
    from .eval.downstream import TASKS
    from .editors import EDITORS
    from .models.loading import REGISTRY

    models, editors, sizes = list(REGISTRY), list(EDITORS), sorted(ME_PPL_FILES)
    model, ppl = _one_of(models, "a model name"), _one_of(sizes, "an ME-PPL size")
    return dict(
        model=model, device=_device, seed=_int_from(0), results_dir=_text("a folder"),
        n_cases=_int_from(1), n_ppl=ppl, n_edits=_int_from(1), n_downstream=_items_per_task(TASKS),
        n_ppl_checkpoint=_one_of(sizes, "an ME-PPL size", null="no checkpoints"), n_checkpoints=_int_from(2),
        downstream_at_start=_flag,
        editors=_names(editors, "editor", empty=False), random_editors=_names(editors, "editor"),
        n_counterfact=_int_from(0, null="all"), n_zsre=_int_from(0, null="all"), n_first_token=_int_from(0),
        n_screen=_int_from(0), n_random=_int_from(1), downstream_tasks=_names(TASKS, "downstream task"),
        mom2_tokens=_int_from(1, null="all of WikiText-2"), bos_model=_one_of(models, "a model name", null="skip"),
        n_texts=_int_from(1), n_bos_cases=_int_from(1), c_tokens=_int_from(1, null="all of WikiText-2"),
        c_seq_lens=_lengths, first_shares=_shares, n_c_cases=_int_from(1), second2first_model=model,
        n_second2first=_int_from(1), guard_models=_names(models, "model"),
        hardcf=_text("auto or the path of a HardCF"), offline_calls=_int_from(0), local_calls=_int_from(0),
        endpoint_calls=_int_from(0), endpoint_timeout=_number_above(0), first_token=_flag_or_null,
        max_subject_tokens=_int_from(1), n_filter=_int_from(0), n_ppl_filter=ppl, hardedit_path=_model_path,
    )


def check_values(params: dict[str, dict], overrides: dict, profile_name: str, schema: dict[str, Check]) -> None:
    """Refuse, with every reason at once, the values of `params` ({notebook: {parameter: value}}) that do not
    fit their parameter's check; each reason names the parameter and where its value came from."""
    reasons = []
    for stem, values in params.items():
        for name, value in values.items():
            why = schema[name](value) if name in schema else None
            if why:
                where = f"--set {name}={value!r}" if name in overrides else f"profile {profile_name!r}, {stem}"
                reason = f"{where}: parameter {name!r} {why}, got the {_kind(value)} {value!r}"
                if reason not in reasons:
                    reasons.append(reason)
    if reasons:
        raise ValueError("; ".join(reasons))


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
    or a model whose weights cannot be found (`models.check_available`)."""
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

    todo = [m for m in mend_models(params) if not (mend.checkpoint_dir(m) / "mend.pt").exists()]
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


def _only_arg(text: str) -> list[str]:
    try:
        return parse_only(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m editcollapse.reproduce", description=__doc__,
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
        timings = run(args.profile, args.only, parse_overrides(args.overrides), recompute=args.recompute)
    except (NotebookError, ValueError) as err:
        sys.exit(f"reproduce: {err}")
    width = max(len(stem) for stem, _ in timings)
    print(f"\nprofile {args.profile}: wall time per notebook")
    for stem, seconds in timings:
        print(f"  {stem:<{width}}  {seconds:8.1f} s")
    print(f"  {'total':<{width}}  {sum(s for _, s in timings):8.1f} s")


if __name__ == "__main__":
    main()
