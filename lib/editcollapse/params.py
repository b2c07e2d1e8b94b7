"""Notebook parameter values: ``--set`` overrides parsed as YAML, and the checks every value passes before a
notebook starts (`parameter_schema`: type, range, choices such as the editors, models, devices and ME-PPL sizes
that exist; `check_types` for a parameter without a schema, by the types it has elsewhere)."""
from __future__ import annotations

import ast
import functools
import math
import re
from collections.abc import Callable
from pathlib import Path

import yaml


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


def _settings_grid(known: dict[str, list[str]], default: str) -> Check:
    """{name: settings} where each settings mapping may name its "editor" (`default` if not) and holds only that
    editor's settings (`known`: editor -> its settings' names)."""
    def fits(v) -> bool:
        return isinstance(v, dict) and v.get("editor", default) in known \
            and set(v) - {"editor"} <= set(known[v.get("editor", default)])

    def check(value):
        if (isinstance(value, dict) and value and all(isinstance(k, str) and k for k in value)
                and all(fits(v) for v in value.values())):
            return None
        return (f"must map setting names to mappings of settings of {default} (its {', '.join(sorted(known[default]))})"
                f", or of the editor a mapping names as its editor ({', '.join(known)})")
    return check


MODEL_SIZES = {"n_random": (1, False), "max_first_token": (1, True), "n_screen": (0, False), "n_confirm": (0, True)}


def _model_sizes(models) -> Check:
    """{model: {n_random: int >= 1, max_first_token: int >= 1 or null, n_screen: int >= 0, n_confirm: int >= 0 or
    null}}: sizes that replace the notebook's for those models (a large model gets a smaller sample)."""
    def fits(k, n):
        low, nullable = MODEL_SIZES[k]
        return (_is_int(n) and n >= low) or (n is None and nullable)

    def check(value):
        ok = isinstance(value, dict) and all(
            m in models and isinstance(v, dict) and set(v) <= set(MODEL_SIZES) and all(fits(k, n) for k, n in v.items())
            for m, v in value.items())
        return None if ok else ("must map model names to {n_random: int >= 1, max_first_token: int >= 1 or null, "
                                f"n_screen: int >= 0, n_confirm: int >= 0 or null}} (models: {', '.join(models)})")
    return check


@functools.cache
def parameter_schema() -> dict[str, Check]:
    """{parameter: its check}, for every parameter of notebooks/0*.ipynb (a notebook's schema is the checks
    of the names its parameters cell declares). Editors, models, tasks and ME-PPL sizes are those that exist."""
    from .data import ME_PPL_FILES
    from .eval.downstream import TASKS
    from dataclasses import fields

    from .editors import EDITORS
    from .guard import THRESHOLDS as GUARD_THRESHOLDS
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
        n_hardcf=_int_from(0, null="all of this model's shipped HardCF"),
        contrast_model=_one_of(models, "a model name", null="no contrast"),
        contrast_editors=_names(editors, "editor"), n_contrast_random=_int_from(0), n_contrast_first_token=_int_from(0),
        n_screen=_int_from(0), n_random=_int_from(1), downstream_tasks=_names(TASKS, "downstream task"),
        mom2_tokens=_int_from(1, null="all of WikiText-2"), bos_model=_one_of(models, "a model name", null="skip"),
        n_texts=_int_from(1), n_bos_cases=_int_from(1), c_tokens=_int_from(1, null="all of WikiText-2"),
        c_seq_lens=_lengths, first_shares=_shares, n_c_cases=_int_from(1), second2first_model=model,
        n_second2first=_int_from(1), guard_models=_names(models, "model"),
        hardcf=_text("auto or the path of a HardCF"), offline_calls=_int_from(0), local_calls=_int_from(0),
        endpoint_calls=_int_from(0), endpoint_timeout=_number_above(0), first_token=_flag_or_null,
        max_subject_tokens=_int_from(1), n_filter=_int_from(0), n_ppl_filter=ppl, hardedit_path=_model_path,
        n_normal=_int_from(0), n_hard=_int_from(1, null="all"), hardcf_path=_model_path, n_tune=_int_from(0),
        tune_grid=_settings_grid({e: [f.name for f in fields(EDITORS[e]().hyperparams)] for e in editors}, "rome-2k"),
        sequential_editors=_names(editors, "editor"), n_sequential=_int_from(1, null="every test-half hard case"),
        models=_names(models, "model", empty=False), max_first_token=_int_from(1, null="all"),
        model_sizes=_model_sizes(models), n_confirm=_int_from(0, null="every flagged case"), n_margin=_int_from(0),
        n_spill=_int_from(0),
        reference_model=_one_of(sorted(m for m, _ in GUARD_THRESHOLDS), "a model with a calibrated guard threshold"),
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
