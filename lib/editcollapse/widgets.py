"""The JupyterLab edit explorer: pick a model, a case or your own prompt, check its collapse risk, edit, look, undo.

`ExplorerSession` does the work (testable without a browser): the guard's risk score before the
edit (`guard.risk`, −log uᵀk^u, against `guard.threshold_for`), the top-5 next tokens before and
after, ME-PPL perplexity against the collapse threshold, and an exact undo; long steps report
progress through a callback. `risk_html`, `verdict_html`, `predictions_html` and `prediction_chart`
render a report; `edit_explorer()` wires it all to ipywidgets. In a notebook:

    from editcollapse.widgets import edit_explorer
    edit_explorer()
"""
from __future__ import annotations

import html
import io
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from . import data, guard

from .eval import metrics, perplexity
from .editors import EDITORS, EditRequest, get_editor
from .models.keys import context_templates
from .models.loading import DEFAULT_MODEL, REGISTRY, LoadedModel, load_model
from .results import labels
from .results.labels import COLLAPSE_THRESHOLD

Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what runs now)
PHASES = {"templates": "context templates", "keys": "reading the keys k^u, k̄", "v_star": "optimising v*",
          "update": "writing ΔW", "stats": "second moment C", "tokens": "tokenising", "fine_tune": "fine-tuning",
          "factors": "MEND's factors", "diagnostics": "diagnostics"}
RED, GREEN, AMBER, GREY = "#c62828", "#2e7d32", "#e65100", "#616161"


def _quiet(done: int, total: int, text: str) -> None:
    pass


@dataclass
class ExplorerSession:
    """One live model, at most one applied edit at a time."""

    model_name: str = DEFAULT_MODEL
    ppl_size: int = 50
    threshold: float = COLLAPSE_THRESHOLD
    lm: LoadedModel | None = None
    result: object | None = None
    report: dict | None = None  # the live edit's report
    original_ppl: dict = field(default_factory=dict)

    def load(self, name: str) -> None:
        self.undo()
        self.lm, self.model_name = load_model(name), name
        self.original_ppl.pop(name, None)

    def _ready(self, name: str | None, say: Progress, step: int, total: int) -> int:
        """Load `name` (default: the session's model) unless it is the live one; returns the steps done."""
        name = name or self.model_name
        if self.lm is None or name != self.model_name:
            say(step, total, f"loading model {name}")
            self.load(name)
        return step + 1

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

    def predictions(self, text: str) -> list[tuple[str, float]]:
        """The live model's top-5 next tokens after `text`."""
        return metrics.predict_next(self.lm, text, k=5)

    def _risk(self, request: EditRequest, editor: str, say: Callable[[str], None], seconds: dict) -> dict:
        request.validate()
        ed = get_editor(editor)
        if not guard.reads_keys(ed):
            return dict(editor=editor, score=None, threshold=None, risky=None,
                        note=f"the guard reads ROME-style keys; it has no score for {editor}")
        hp = ed.hparams_for(self.lm)
        t = time.perf_counter()
        say("sampling the editor's context templates (once per model)")
        context_templates(self.lm, hp.context_template_length_params, hp.seed)  # the guard and the editor share them
        seconds["templates"] = time.perf_counter() - t
        say("guard: reading the keys k^u, k̄ (before the edit)")
        score, threshold = guard.risk(self.lm, request, ed), guard.threshold_for(self.lm, ed)
        seconds["risk"] = time.perf_counter() - t - seconds["templates"]
        return dict(editor=editor, score=score, threshold=threshold, risky=bool(score > threshold), note=None)

    def check_risk(self, prompt: str, subject: str, target_new: str, editor: str = "rome",
                   model: str | None = None, progress: Progress = _quiet) -> dict:
        """The guard's score of the request on the unedited model, before any edit (a live edit is undone first).

        score = −log(uᵀk^u), flagged (`risky`) when above `guard.threshold_for`; `score` is None for
        an editor whose keys the guard does not read.
        """
        self._ready(model, progress, 0, 2)
        self.undo()
        request = EditRequest(prompt=prompt, subject=subject, target_new=target_new)
        return self._risk(request, editor, lambda text: progress(1, 2, text), {})

    def edit(self, prompt: str, subject: str, target_new: str, editor: str = "rome", model: str | None = None,
             progress: Progress = _quiet, on_risk: Callable[[dict], None] | None = None) -> dict:
        """Apply one edit (undoing any previous one) and report the guard's risk, what changed and the perplexity.

        The guard's verdict goes to `on_risk` as soon as it is known, before the editor runs.
        """
        total, t0, seconds = 7, time.perf_counter(), {}
        step = self._ready(model, progress, 0, total)
        self.undo()
        seconds["load"] = time.perf_counter() - t0
        if self.model_name not in self.original_ppl:
            progress(step, total, f"measuring the unedited model's perplexity (ME-PPL_{self.ppl_size})")
        base = self.base_ppl()
        seconds["ppl_before"] = time.perf_counter() - t0 - seconds["load"]
        request = EditRequest(prompt=prompt, subject=subject, target_new=target_new)
        risk = self._risk(request, editor, lambda text: progress(2, total, text), seconds)
        if on_risk is not None:
            on_risk(risk)
        progress(3, total, "predictions before the edit")
        text = prompt.replace("{}", subject)
        before = self.predictions(text)
        ed = get_editor(editor)

        def announce(phase, started):  # the editor's own phases, as they start
            if started:
                progress(4, total, f"{ed.name}: {PHASES.get(phase, phase)}")

        ed.on_phase(announce)
        progress(4, total, f"{ed.name}: editing")
        t = time.perf_counter()
        self.result = ed.apply(self.lm, request)
        seconds["edit"] = time.perf_counter() - t
        progress(5, total, "predictions after the edit")
        after = self.predictions(text)
        progress(6, total, f"measuring perplexity (ME-PPL_{self.ppl_size})")
        t = time.perf_counter()
        ppl = perplexity.me_ppl(self.lm, self.ppl_size, progress=False)["mean"]
        seconds["ppl"] = time.perf_counter() - t
        d = self.result.diagnostics  # the common part, and ROME's denominator where the editor has one
        report = dict(model=self.model_name, editor=ed.name, text=text, target_new=target_new, risk=risk,
                      before=before, after=after, ppl_before=base, threshold=self.threshold,
                      **labels.collapse_report(ppl, base, self.threshold),
                      denominator=d.get("denominator"), delta_norm=d["delta_norm"], rel_change=d["rel_change"])
        if self.result.test_prefix is not None:
            report["prefix"] = self.result.test_prefix
            report["after_with_prefix"] = self.predictions(metrics.with_prefix(text, self.result.test_prefix))
        report["seconds"] = dict(seconds, total=time.perf_counter() - t0)
        progress(total, total, f"done in {report['seconds']['total']:.1f} s")
        self.report = report
        return report

    def undo(self) -> dict | None:
        """Restore the weights of the live edit; returns its report (None when nothing was live)."""
        if self.result is None:
            return None
        self.result.undo()
        report, self.result, self.report = self.report, None, None
        return report


# ---------------------------------------------------------------- rendering (plain HTML and a figure)
def _banner(colour: str, text: str) -> str:
    return (f'<div style="background:{colour};color:white;padding:6px 10px;border-radius:4px;'
            f'font-weight:bold;font-size:1.1em">{text}</div>')


def _num(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:,.1f}" if abs(x) >= 100 else f"{x:.3g}"


def risk_html(risk: dict) -> str:
    """The guard's verdict on a request, before the edit."""
    if risk["score"] is None:
        return _banner(GREY, f"guard: no risk score ({html.escape(risk['note'])})")
    divisor = math.exp(-risk["score"]) if math.isfinite(risk["score"]) else 0.0
    detail = (f"risk −log(uᵀk^u) = {_num(risk['score'])} {'>' if risk['risky'] else '≤'} threshold "
              f"{_num(risk['threshold'])} (ROME's divisor uᵀk^u = {divisor:.3g})")
    if risk["risky"]:
        return _banner(AMBER, f"guard: HIGH COLLAPSE RISK for {risk['editor']}: {detail}")
    return _banner(GREEN, f"guard: low collapse risk for {risk['editor']}: {detail}")


def verdict_html(report: dict) -> str:
    """The perplexity against the collapse threshold; a collapse in a red banner."""
    ppl, thr = report["ppl"], report["threshold"]
    rel = f"×{report['ratio']:,.2f} the unedited {_num(report['ppl_before'])}"
    if report["collapsed"]:
        return _banner(RED, f"COLLAPSED: perplexity {_num(ppl)} > threshold {_num(thr)} ({rel})")
    return _banner(GREEN, f"not collapsed: perplexity {_num(ppl)} ≤ threshold {_num(thr)} ({rel})")


def predictions_html(report: dict) -> str:
    """Before / after top-5 as a table, and the update's size."""
    cols = [("before", report["before"]), ("after", report["after"])]
    if "after_with_prefix" in report:
        cols.append((f"after, prefix {report['prefix']!r}", report["after_with_prefix"]))
    head = "".join(f"<th colspan=2 style='text-align:left'>{html.escape(name)}</th>" for name, _ in cols)
    rows = "".join("<tr>" + "".join(f"<td><code>{html.escape(repr(p[i][0]))}</code></td>"
                                    f"<td style='padding:0 1.5em 0 0.5em'>{p[i][1]:.3f}</td>"
                                    for _, p in cols) + "</tr>" for i in range(len(report["before"])))
    denominator = f"denominator {report['denominator']:.4g} · " if report["denominator"] is not None else ""
    return (f"<div><b>{html.escape(report['text'])}</b> → {html.escape(report['target_new'])} "
            f"({report['editor']} on {report['model']})</div><table class='ec-predictions'><tr>{head}</tr>{rows}</table>"
            f"<div>{denominator}‖ΔW‖ {report['delta_norm']:.4g} · ‖ΔW‖/‖W‖ {report['rel_change']:.3g}</div>")


def prediction_chart(report: dict):
    """Two bar panels, top-5 next tokens before and after the edit (the new target's first token in red)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 2.2), layout="constrained")
    target = report["target_new"].strip()
    for ax, (name, preds) in zip(fig.subplots(1, 2, sharex=True), [("before", report["before"]),
                                                                   ("after", report["after"])]):
        tokens, probs = [repr(t) for t, _ in preds][::-1], [p for _, p in preds][::-1]
        hit = [bool(t.strip()) and target.startswith(t.strip()) for t, _ in preds][::-1]
        ax.bar_label(ax.barh(tokens, probs, color=[RED if h else "#1565c0" for h in hit]), fmt="%.2f", fontsize=7)
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=8)
    return fig


def chart_png(report: dict) -> bytes:
    buf = io.BytesIO()
    prediction_chart(report).savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# ---------------------------------------------------------------- the widget
def edit_explorer(session: ExplorerSession | None = None):
    """Build and return the ipywidgets explorer (display it as a notebook cell's last value)."""
    import ipywidgets as w

    s = session or ExplorerSession()
    wide, label = dict(layout=w.Layout(width="46em")), dict(style={"description_width": "6em"})
    model = w.Dropdown(options=list(REGISTRY), value=s.model_name, description="model", **label)
    editor = w.Dropdown(options=list(EDITORS), value="rome", description="editor", **label)
    case_id = w.BoundedIntText(value=0, min=0, max=21918, description="case id", **label)
    pick = w.Button(description="load CounterFact case", layout=w.Layout(width="auto"))
    prompt = w.Text(value="{} was acquired by", description="prompt", **wide, **label)
    subject = w.Text(value="Twitter", description="subject", **wide, **label)
    target = w.Text(value="Microsoft", description="new target", **wide, **label)
    check = w.Button(description="check risk", icon="shield", layout=w.Layout(width="auto"))
    run = w.Button(description="edit", icon="pencil", button_style="primary", layout=w.Layout(width="auto"))
    undo = w.Button(description="undo", icon="undo", layout=w.Layout(width="auto"))
    bar = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="20em"))
    status = w.HTML("ready")
    risk, verdict, table = w.HTML(), w.HTML(), w.HTML()
    chart = w.Image(format="png", layout=w.Layout(display="none"))
    for widget, name in [(model, "model"), (editor, "editor"), (case_id, "case"), (pick, "pick"), (prompt, "prompt"),
                         (subject, "subject"), (target, "target"), (check, "check"), (run, "edit"), (undo, "undo"),
                         (bar, "progress"), (status, "status"), (risk, "risk"), (verdict, "verdict"), (table, "table"),
                         (chart, "chart")]:
        widget.add_class(f"ec-{name}")
    buttons = [pick, check, run, undo]

    def progress(done, total, text):
        bar.max, bar.value, status.value = total, done, html.escape(text)

    def clear_result():
        verdict.value = table.value = ""
        chart.layout.display = "none"

    def busy(fn):  # one action at a time; an error is shown, not raised
        def handler(_):
            for b in buttons:
                b.disabled = True
            try:
                fn()
            except Exception as e:  # shown to the user, who fixes the input
                bar.bar_style = "danger"
                status.value = f'<span style="color:{RED}">{type(e).__name__}: {html.escape(str(e))}</span>'
            finally:
                for b in buttons:
                    b.disabled = False
        return handler

    def do_pick():
        c = s.case(case_id.value)
        prompt.value, subject.value, target.value = c["prompt"], c["subject"], c["target_new"]
        risk.value = ""
        status.value = html.escape(f"case {c['case_id']}: {c['prompt'].format(c['subject'])} "
                                   f"[{c['ground_truth']} → {c['target_new']}]")

    def do_check():
        bar.bar_style, risk.value = "", ""
        clear_result()
        r = s.check_risk(prompt.value, subject.value, target.value, editor.value, model.value, progress)
        risk.value = risk_html(r)
        progress(bar.max, bar.max, "risk checked; the model is unedited")

    def do_edit():
        bar.bar_style, risk.value = "", ""
        clear_result()
        report = s.edit(prompt.value, subject.value, target.value, editor.value, model.value, progress,
                        on_risk=lambda r: setattr(risk, "value", risk_html(r)))
        risk.value, verdict.value, table.value = risk_html(report["risk"]), verdict_html(report), predictions_html(report)
        chart.value, chart.layout.display = chart_png(report), None
        sec = report["seconds"]
        parts = [f"{name} {sec[key]:.1f} s" for key, name in (
            ("load", "model load"), ("ppl_before", "unedited perplexity"), ("templates", "context templates"),
            ("risk", "guard"), ("edit", "edit"), ("ppl", "perplexity")) if sec.get(key, 0) >= 0.05]
        progress(bar.max, bar.max, f"edit applied in {sec['total']:.1f} s ({', '.join(parts)})")

    def do_undo():
        undone = s.undo()
        clear_result()
        if undone is None:
            status.value = "nothing to undo"
            return
        now = s.predictions(undone["text"])
        top = repr(now[0][0])
        same = "as before the edit" if now == undone["before"] else "NOT as before the edit"
        status.value = html.escape(f"edit undone: weights restored exactly; top prediction {top} again, {same}")
        bar.bar_style, bar.value = "", 0

    pick.on_click(busy(do_pick))
    check.on_click(busy(do_check))
    run.on_click(busy(do_edit))
    undo.on_click(busy(do_undo))
    return w.VBox([w.HBox([model, editor]), w.HBox([case_id, pick]), prompt, subject, target,
                   w.HBox([check, run, undo]), w.HBox([bar, status]), risk, verdict, w.HBox([chart, table])])
