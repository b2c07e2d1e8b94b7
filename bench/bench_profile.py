"""The cost of a profile, notebook by notebook, planned before it runs.

    .venv/bin/python bench/bench_profile.py [--profile local] --units bench/profile_units.json [--unit edit.rome=9]
    .venv/bin/python bench/bench_profile.py [--profile local] --measure [--write-units FILE]

Every notebook's work is counted from the profile's parameters (notebooks/params/<profile>.yaml, as
`make reproduce` reads them): single edits per editor and model, sequential steps, ME-PPL evaluations per size,
downstream items per task, keys behind C. Each count is multiplied by its seconds per unit, and a table per
notebook and the total are printed.

Seconds per unit come from a JSON file (`--units`; bench/profile_units.json holds the figures of `make bench`
and docs/downstream_lmeval.md, with their sources), from `--unit key=seconds` flags (e.g. `edit.rome=9`,
`ppl.50=4`, `downstream_item.squad2=5`, `model_factor.gemma3-270m=2.5`), or, with `--measure`, from a short
measurement on this machine (one warm and one timed edit per editor, ME-PPL at each size used, a few downstream
items per task; minutes, and only meaningful on an idle machine). `--write-units` saves what was measured.

Counts follow the notebooks: single-edit samples are nested (same seed), so a notebook pays only for the edits
that an earlier one of the same profile has not stored (e.g. notebook 02 reuses notebook 01's ROME edits).
Small parts (figures, the CLI's guard screening, HardEdit's offline generation, Second2First on tiny-gpt2) are left out;
MEND's training is not counted (`make train-mend`, once per model). The first-token sample is capped at the
number of first-token cases CounterFact has for the model, where data/hardcf/<model>.summary.json records it.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from editcollapse import machine, reproduce
from editcollapse.paths import atomic_write_text, data_dir

UNITS = Path(__file__).with_name("profile_units.json")


# ---------------------------------------------------------------- units
def load_units(base: dict | Path | None, flags: list[str]) -> dict:
    """The units of `base` (a dict, or a JSON file), then each `group.key=seconds` flag over them."""
    units = json.loads(Path(base).read_text()) if isinstance(base, (str, Path)) else dict(base or {})
    for flag in flags:
        key, sep, value = flag.partition("=")
        if not sep:
            raise SystemExit(f"--unit expects group.key=seconds, got {flag!r}")
        group, _, sub = key.partition(".")
        if sub:
            units[group] = {**units.get(group, {}), sub: float(value)}
        else:
            units[group] = float(value)
    return units


def measure_units(params: dict[str, dict], steps: int = 1, n_items: int = 5) -> dict:
    """Seconds per unit on this machine for what the profile uses: per editor one warm and `steps` timed edits
    (undone), ME-PPL at each size, `n_items` downstream items per task, and the model's edit metrics."""
    from editcollapse import data
    from editcollapse.editors import EditRequest, get_editor
    from editcollapse.eval import metrics
    from editcollapse.eval.downstream import evaluate_all
    from editcollapse.eval.perplexity import me_ppl
    from editcollapse.models.loading import load_model

    def seconds(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    model = next(p["model"] for p in params.values() if "model" in p)
    device = next((p["device"] for p in params.values() if "device" in p), None)
    lm = load_model(model, device=device)
    cases = data.load_counterfact(n=steps + 1, seed=7)
    editors = sorted({e for p in params.values() for e in [*(p.get("editors") or []), *(p.get("random_editors") or []),
                                                            *(p.get("contrast_editors") or [])]} | {"rome", "c-rome"})
    units = dict(about=f"measured by bench/bench_profile.py --measure on {machine.summary()}", edit={}, ppl={},
                 downstream_item={})
    for name in editors:
        editor = get_editor(name)

        def edit(case):
            editor.apply(lm, EditRequest.from_case(case)).undo()
        try:
            edit(cases[0])  # warm: C, templates, a trained MEND
        except Exception as e:  # noqa: BLE001 - e.g. MEND without a checkpoint
            print(f"  {name}: not measured ({type(e).__name__}: {str(e)[:120]})")
            continue
        units["edit"][name] = sum(seconds(lambda c=c: edit(c)) for c in cases[1:]) / steps
        print(f"  edit {name}: {units['edit'][name]:.2f} s", flush=True)
    units["edit_metrics"] = seconds(lambda: metrics.edit_metrics(lm, cases[0], metrics.locality_reference(lm, cases[0])))
    sizes = {p[k] for p in params.values() for k in ("n_ppl", "n_ppl_checkpoint", "n_ppl_filter") if p.get(k)}
    for size in sorted(sizes):
        units["ppl"][str(size)] = seconds(lambda: me_ppl(lm, size, progress=False))
        print(f"  ME-PPL_{size}: {units['ppl'][str(size)]:.1f} s", flush=True)
    tasks = sorted({t for p in params.values() for t in (p.get("downstream_tasks") or [])}
                   | ({"piqa", "hellaswag", "mmlu", "lambada", "nq", "squad2"} if any("n_edits" in p for p in params.values())
                      else set()))
    for task in tasks:
        units["downstream_item"][task] = seconds(lambda: evaluate_all(lm, tasks=[task], n=n_items, seed=0)) / n_items
        print(f"  downstream {task}: {units['downstream_item'][task]:.2f} s per item", flush=True)
    defaults = json.loads(UNITS.read_text())
    for key in ("downstream_full", "model_factor", "c_keys_per_s", "screen_case"):
        units[key] = defaults[key]
    return units


# ---------------------------------------------------------------- counts
@dataclass
class Plan:
    """Lines (notebook, what, count, seconds per unit) and the edits stored so far, per (model, editor, sample):
    samples are nested, so a later notebook pays for max(0, n - done)."""

    units: dict
    lines: list = field(default_factory=list)
    done: dict = field(default_factory=dict)

    def add(self, notebook: str, what: str, count: float, unit: float) -> None:
        if count:
            self.lines.append((notebook, what, count, unit))

    def new(self, model: str, editor: str, sample: str, n: int) -> int:
        key = (model, editor, sample)
        extra = max(0, n - self.done.get(key, 0))
        self.done[key] = max(n, self.done.get(key, 0))
        return extra

    def factor(self, model: str) -> float:
        return float(self.units.get("model_factor", {}).get(model, 1.0))

    def edit(self, editor: str, model: str) -> float:
        known = self.units["edit"]
        name = editor if editor in known else max((k for k in known if editor.startswith(k + "-")), key=len,
                                                   default=None)  # rome-mom2: ROME's seconds
        return (known[name] if name else float("nan")) * self.factor(model)

    def ppl(self, size: int, model: str) -> float:
        return float(self.units["ppl"][str(size)]) * self.factor(model)

    def single(self, notebook: str, model: str, editor: str, sample: str, n: int, ppl: int) -> None:
        """Single edits: the edit, its metrics and ME-PPL_<ppl>, for the cases not yet stored."""
        extra = self.new(model, editor, sample, n)
        unit = self.edit(editor, model) + (self.units.get("edit_metrics", 0.0) + self.ppl(ppl, "")) * self.factor(model)
        self.add(notebook, f"{editor} single edits, {sample} ({model})", extra, unit)

    def items(self, n_downstream, task: str) -> int:
        n = n_downstream.get(task) if isinstance(n_downstream, dict) else n_downstream
        full = int(self.units.get("downstream_full", {}).get(task, 0))
        return full if n is None else min(n, full) if full else n

    def downstream(self, notebook: str, what: str, models: int, tasks, n_downstream) -> None:
        for task in tasks:
            n = self.items(n_downstream, task)
            self.add(notebook, f"{what}: {task} x {n} items", models * n, self.units["downstream_item"][task])


# CounterFact's first-token cases per tokenizer (`experiments.single.first_token_cases` over all 21,919 cases), and
# a guess for a model that neither this table nor its HardCF summary gives
FIRST_TOKEN_CASES = {"smollm2-135m": 47, "gemma3-270m": 235, "qwen2.5-1.5b": 76}
FIRST_TOKEN_GUESS = 60


def first_token_available(model: str) -> int | None:
    path = data_dir() / "hardcf" / f"{model}.summary.json"
    known = json.loads(path.read_text()).get("first_token_cases") if path.exists() else None
    return known if known is not None else FIRST_TOKEN_CASES.get(model)


def hardcf_size(model: str, n: int | None) -> int:
    path = data_dir() / "hardcf" / f"{model}.json"
    size = len(json.loads(path.read_text())) if path.exists() else 0
    return size if n is None else min(n, size)


def first_token(model: str, n: int | None) -> int:
    """`n` first-token cases, at most as many as the model has (None: all of them)."""
    known = first_token_available(model)
    if known is None:
        return FIRST_TOKEN_GUESS if n is None else n
    return known if n is None else min(n, known)


def plan_profile(params: dict[str, dict], units: dict) -> Plan:
    plan = Plan(units)
    from editcollapse.eval.downstream import TASKS

    if p := params.get("01_pilot_observation"):
        nb, m = "01", p["model"]
        plan.add(nb, f"ME-PPL_{p['n_ppl']} of the unedited model", 1, plan.ppl(p["n_ppl"], m))
        plan.single(nb, m, "rome", "random", p["n_cases"] // 2, p["n_ppl"])
        plan.single(nb, m, "rome", "first-token", first_token(m, p["n_cases"] - p["n_cases"] // 2), p["n_ppl"])
        plan.single(nb, m, "rome", "hardcf", hardcf_size(m, p.get("n_hardcf", 0)), p["n_ppl"])
        plan.add(nb, "ROME edits applied again for downstream", 2 * p["n_edits"], plan.edit("rome", m))
        plan.downstream(nb, f"downstream, unedited + {p['n_edits']} normal + {p['n_edits']} collapsed",
                        1 + 2 * p["n_edits"], TASKS, p["n_downstream"])
    if p := params.get("02_single_edit"):
        nb, m = "02", p["model"]
        plan.add(nb, f"ME-PPL_{p['n_ppl']} of the unedited model", 1, plan.ppl(p["n_ppl"], m))
        random = p["n_counterfact"] if p["n_counterfact"] is not None else 21919
        for editor in p["editors"]:
            plan.single(nb, m, editor, "random", random, p["n_ppl"])
            plan.single(nb, m, editor, "first-token", first_token(m, p["n_first_token"]), p["n_ppl"])
            plan.single(nb, m, editor, "hardcf", hardcf_size(m, p.get("n_hardcf", 0)), p["n_ppl"])
            plan.single(nb, m, editor, "zsre", p["n_zsre"] if p["n_zsre"] is not None else 1000, p["n_ppl"])
        if p.get("contrast_model") and (p.get("n_contrast_random") or p.get("n_contrast_first_token")):
            for model in (m, p["contrast_model"]):
                plan.add(nb, f"ME-PPL_{p['n_ppl']} of the unedited {model}", 1, plan.ppl(p["n_ppl"], model))
                for editor in p["contrast_editors"]:
                    plan.single(nb, model, editor, "random", p["n_contrast_random"], p["n_ppl"])
                    plan.single(nb, model, editor, "first-token", first_token(model, p["n_contrast_first_token"]),
                                p["n_ppl"])
    if p := params.get("03_sequential_edit"):
        nb, m = "03", p["model"]
        plan.single(nb, m, "rome", "first-token", 0 if hardcf_size(m, None) else first_token(m, p["n_screen"]),
                    p["n_ppl"])
        n_check = p["n_checkpoints"] if p["n_ppl_checkpoint"] else 0
        n_down = 2 if p["downstream_at_start"] else 1
        for editor in dict.fromkeys(p["editors"] + p["random_editors"]):
            runs = [(r, p["n_cases"]) for r in ("hard", "normal") if editor in p["editors"]]
            runs += [("random", p["n_random"])] if editor in p["random_editors"] else []
            steps = sum(n for _, n in runs)
            plan.add(nb, f"{editor} sequential steps ({'+'.join(r for r, _ in runs)})", steps,
                     plan.edit(editor, m) + units.get("edit_metrics", 0.0) + plan.ppl(p["n_ppl"], m))
            plan.add(nb, f"{editor} ME-PPL_{p['n_ppl']} at step 0", len(runs), plan.ppl(p["n_ppl"], m))
            if n_check:
                plan.add(nb, f"{editor} ME-PPL_{p['n_ppl_checkpoint']} checkpoints", len(runs) * n_check,
                         plan.ppl(p["n_ppl_checkpoint"], m))
            plan.downstream(nb, f"{editor} downstream, {n_down}x per hard/normal run",
                            n_down * sum(r != "random" for r, _ in runs), p["downstream_tasks"], p["n_downstream"])
    if p := params.get("04_crome_analysis"):
        nb, m = "04", p["model"]
        samples = [("random", p["n_random"]), ("first-token", first_token(m, p["n_first_token"])),
                   ("hardcf", hardcf_size(m, p.get("n_hardcf", 0)))]
        collapse = hardcf_size(m, p.get("n_hardcf", 0)) + first_token(m, p["n_first_token"]) // 2
        for editor in ("rome", "c-rome", "rome-mom2"):
            for sample, n in samples:
                plan.single(nb, m, editor, sample, n, p["n_ppl"])
        plan.single(nb, m, "c-rome-prefix", "collapse", collapse, p["n_ppl"])
        keys = units.get("c_keys_per_s", 2490)
        plan.add(nb, f"C of the mom2 runs ({p['mom2_tokens']} tokens; cached afterwards)", p["mom2_tokens"] or 302000,
                 1 / keys)
        variants = len(p["c_seq_lens"]) + len(p["first_shares"])
        plan.add(nb, f"C-gathering study: {variants} C of {p['c_tokens']} tokens", variants * (p["c_tokens"] or 302000),
                 1 / keys)
        plan.single(nb, m, "rome-c-variants", "collapse+normal", 2 * p["n_c_cases"] * variants, p["n_ppl"])
        plan.single(nb, m, "rome-bos", "collapse", p["n_bos_cases"], p["n_ppl"])
    if p := params.get("05_hardedit"):
        nb, m = "05", p["model"]
        plan.single(nb, m, "rome", "hardedit-candidates", p["n_filter"], p.get("n_ppl_filter", 50))
        for editor in p["editors"]:
            plan.add(nb, f"{editor} sequential steps (hardedit+normal)", 2 * p["n_cases"],
                     plan.edit(editor, m) + units.get("edit_metrics", 0.0) + plan.ppl(p["n_ppl"], m))
            plan.add(nb, f"{editor} ME-PPL_{p['n_ppl']} at step 0", 2, plan.ppl(p["n_ppl"], m))
            plan.downstream(nb, f"{editor} downstream at the last step", 2, p["downstream_tasks"], p["n_downstream"])
    if p := params.get("07_scale"):
        nb = "07"
        from editcollapse.analysis.scale import sample_sizes
        from editcollapse.models.loading import get_spec

        for m in p["models"]:
            sizes = sample_sizes(m, p["model_sizes"], n_random=p["n_random"], max_first_token=p["max_first_token"],
                                 n_screen=p.get("n_screen", 0), n_confirm=p.get("n_confirm"))
            n_first = first_token(m, sizes["max_first_token"])
            plan.add(nb, f"ME-PPL_{p['n_ppl']} of the unedited {m}", 1, plan.ppl(p["n_ppl"], m))
            plan.single(nb, m, "rome", "random", sizes["n_random"], p["n_ppl"])
            plan.single(nb, m, "rome", "first-token", n_first, p["n_ppl"])
            collapse = 0 if get_spec(m).prepend_bos else n_first  # no BOS: most first-token cases collapse
            for editor in ("c-rome", "c-rome-prefix"):
                plan.single(nb, m, editor, "first-token", collapse, p["n_ppl"])
            plan.add(nb, f"{m}: ROME edits measured on unrelated text (edit only)", 2 * p.get("n_spill", 0),
                     plan.edit("rome", m))
            if sizes["n_screen"]:  # keys of every first-token case and the random sample, then the confirming edits
                n_all_first = first_token(m, None)
                plan.add(nb, f"guard screen of {m}: keys", sizes["n_screen"] + n_all_first,
                         units.get("screen_case", 0.055) * plan.factor(m))
                confirm = (sizes["n_confirm"] if sizes["n_confirm"] is not None else n_all_first) + p.get("n_margin", 0)
                plan.single(nb, m, "rome", "screen", confirm, p["n_ppl"])
    return plan


def print_plan(plan: Plan, profile: str) -> float:
    total = 0.0
    for nb in dict.fromkeys(line[0] for line in plan.lines):
        lines = [line for line in plan.lines if line[0] == nb]
        print(f"\nnotebook {nb} (profile {profile})")
        print(f"  {'what':<70} {'count':>8} {'s/unit':>8} {'hours':>7}")
        sub = 0.0
        for _, what, count, unit in lines:
            sub += count * unit
            print(f"  {what:<70} {count:>8,.0f} {unit:>8.3g} {count * unit / 3600:>7.2f}")
        print(f"  {'notebook ' + nb:<70} {'':>8} {'':>8} {sub / 3600:>7.2f}")
        total += sub
    print(f"\ntotal, profile {profile}: {total / 3600:.1f} hours ({total / 86400:.2f} days) on the units' machine")
    return total


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="local")
    ap.add_argument("--only", default=None, help="notebook numbers, e.g. 02,03 (default: all)")
    ap.add_argument("--units", type=Path, default=None,
                    help=f"seconds per unit, JSON (default without --measure: {UNITS.relative_to(UNITS.parent.parent)})")
    ap.add_argument("--unit", action="append", default=[], metavar="KEY=SECONDS",
                    help="override one unit, e.g. edit.rome=9, ppl.50=4, downstream_item.squad2=5")
    ap.add_argument("--measure", action="store_true", help="measure the units on this machine (minutes; idle machine)")
    ap.add_argument("--steps", type=int, default=1, help="timed edits per editor with --measure")
    ap.add_argument("--write-units", type=Path, default=None, help="save the measured units to this JSON file")
    a = ap.parse_args(argv)
    only = [x for x in (a.only or "").replace(",", " ").split() if x] or None
    _, params = reproduce.prepare(a.profile, only)
    print(f"profile {a.profile}: {', '.join(params)}; {machine.summary()}")
    if a.measure:
        units = measure_units(params, a.steps)
        if a.write_units:
            atomic_write_text(a.write_units, json.dumps(units, indent=1) + "\n")
        units = load_units(units, a.unit)
    else:
        units = load_units(a.units or UNITS, a.unit)
        print(f"units from {a.units or UNITS}{' and --unit ' + ' '.join(a.unit) if a.unit else ''} (not measured here)")
    return print_plan(plan_profile(params, units), a.profile)


if __name__ == "__main__":
    main()
