"""The JupyterLab edit explorer: pick a model, a case or your own prompt, edit, look, undo.

`ExplorerSession` does the work (testable without a browser); `edit_explorer()` wires it to
ipywidgets. In a notebook:

    from editcollapse.widgets import edit_explorer
    edit_explorer()
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import data, metrics, perplexity
from .editors import EDITORS, EditRequest, get_editor
from .models import DEFAULT_MODEL, REGISTRY, LoadedModel, load_model


@dataclass
class ExplorerSession:
    """One live model, at most one applied edit at a time."""

    model_name: str = DEFAULT_MODEL
    ppl_size: int = 50
    lm: LoadedModel | None = None
    result: object | None = None
    original_ppl: dict = field(default_factory=dict)

    def load(self, name: str) -> None:
        self.undo()
        self.lm, self.model_name = load_model(name), name
        self.original_ppl.pop(name, None)

    def base_ppl(self) -> float:
        if self.model_name not in self.original_ppl:
            self.original_ppl[self.model_name] = perplexity.me_ppl(self.lm, self.ppl_size, progress=False)["mean"]
        return self.original_ppl[self.model_name]

    @staticmethod
    def case(case_id: int) -> dict:
        """A CounterFact case by id."""
        found = [c for c in data.load_counterfact() if c["case_id"] == case_id]
        if not found:
            raise KeyError(f"no CounterFact case {case_id} (ids run 0..21918)")
        return found[0]

    def edit(self, prompt: str, subject: str, target_new: str, editor: str = "rome") -> dict:
        """Apply one edit (undoing any previous one) and report what changed."""
        if self.lm is None:
            self.load(self.model_name)
        self.undo()
        base = self.base_ppl()
        request = EditRequest(prompt=prompt, subject=subject, target_new=target_new)
        text = prompt.replace("{}", subject)
        before = metrics.predict_next(self.lm, text, k=5)
        self.result = get_editor(editor).apply(self.lm, request)
        after = metrics.predict_next(self.lm, text, k=5)
        ppl = perplexity.me_ppl(self.lm, self.ppl_size, progress=False)["mean"]
        d = self.result.diagnostics  # the common part, and ROME's denominator where the editor has one
        report = dict(before=before, after=after, ppl_before=base, **perplexity.collapse_report(ppl, base),
                      denominator=d.get("denominator"), delta_norm=d["delta_norm"], rel_change=d["rel_change"])
        if self.result.test_prefix is not None:
            report["prefix"] = self.result.test_prefix
            report["after_with_prefix"] = metrics.predict_next(self.lm, metrics.with_prefix(text, self.result.test_prefix), k=5)
        return report

    def undo(self) -> None:
        if self.result is not None:
            self.result.undo()
            self.result = None


def _format(report: dict) -> str:
    def top(preds):
        return ", ".join(f"{t!r} {p:.2f}" for t, p in preds)

    lines = [f"before: {top(report['before'])}", f"after:  {top(report['after'])}"]
    if "after_with_prefix" in report:
        lines.append(f"after, with test prefix {report['prefix']!r}: {top(report['after_with_prefix'])}")
    lines += [f"ME-PPL perplexity: {report['ppl_before']:.1f} -> {report['ppl']:.1f} (x{report['ratio']:.1f})",
              (f"denominator: {report['denominator']:.4g}   " if report["denominator"] is not None else "")
              + f"||ΔW||: {report['delta_norm']:.4g}   ||ΔW||/||W||: {report['rel_change']:.3g}",
              "COLLAPSED" if report["collapsed"] else "not collapsed"]
    return "\n".join(lines)


def edit_explorer(session: ExplorerSession | None = None):
    """Build and return the ipywidgets explorer (display it as a notebook cell's last value)."""
    import ipywidgets as w

    s = session or ExplorerSession()
    model = w.Dropdown(options=list(REGISTRY), value=s.model_name, description="model")
    case_id = w.BoundedIntText(value=0, min=0, max=21918, description="case id")
    pick = w.Button(description="load CounterFact case")
    prompt = w.Text(value="{} was acquired by", description="prompt")
    subject = w.Text(value="Twitter", description="subject")
    target = w.Text(value="Microsoft", description="new target")
    editor = w.Dropdown(options=list(EDITORS), value="rome", description="editor")
    run, undo = w.Button(description="edit", button_style="primary"), w.Button(description="undo")
    out = w.Output()

    def show(fn):
        def handler(_):
            out.clear_output()
            with out:
                try:
                    fn()
                except Exception as e:  # shown to the user, who fixes the input
                    print(f"{type(e).__name__}: {e}")
        return handler

    def do_pick():
        c = s.case(case_id.value)
        prompt.value, subject.value, target.value = c["prompt"], c["subject"], c["target_new"]
        print(f"case {c['case_id']}: {c['prompt']} [{c['ground_truth']} -> {c['target_new']}]")

    def do_edit():
        if s.lm is None or model.value != s.model_name:
            print(f"loading {model.value} ...")
            s.load(model.value)
        print(_format(s.edit(prompt.value, subject.value, target.value, editor.value)))

    def do_undo():
        s.undo()
        print("edit undone: weights restored exactly")

    pick.on_click(show(do_pick))
    run.on_click(show(do_edit))
    undo.on_click(show(do_undo))
    return w.VBox([w.HBox([model, editor]), w.HBox([case_id, pick]), prompt, subject, target, w.HBox([run, undo]), out])
