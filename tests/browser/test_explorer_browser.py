"""The edit explorer as a user sees it: JupyterLab headless on 127.0.0.1, Debian's Chromium driven by Playwright.

The test opens notebooks/explorer.ipynb (its parameters cell and its `edit_explorer()` cell), runs both, loads CounterFact case 946
("Bay, which is located in" → Italy, a subject that is the prompt's first token: ROME collapses
SmolLM2 with it), clicks edit and reads the page: progress while the edit runs, the guard's risk
shown before the result, the top-5 predictions before (checked against SmolLM2 loaded here) and
after, the perplexity and the collapse banner; then undo, and the guard's check on the unedited
model. Screenshots and timings go to tests/browser/artifacts/ (or $EDITCOLLAPSE_ARTIFACTS).

Needs the `chromium` package (or $EDITCOLLAPSE_CHROMIUM) and `pip install playwright` (no browser
download); skips with the reason otherwise.
"""
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from editcollapse.eval.metrics import predict_next

pytestmark = [pytest.mark.browser, pytest.mark.integration]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: "
                               "pip install playwright==1.65.2 (no browser download; Debian's chromium is used)")
CHROMIUM = os.environ.get("EDITCOLLAPSE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no Chromium: apt-get install chromium, or set EDITCOLLAPSE_CHROMIUM to its path",
                allow_module_level=True)

NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "explorer.ipynb"  # the one `make lab` users open
ARTIFACTS = Path(os.environ.get("EDITCOLLAPSE_ARTIFACTS", Path(__file__).parent / "artifacts"))
TEXT = "Bay, which is located in"
EDIT_TIMEOUT_S = 600  # model load, ME-PPL before and after, ROME: 26 s on an idle 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 serving a temp folder with a copy of notebooks/explorer.ipynb; yields its URL."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(NOTEBOOK, root / "explorer.ipynb")
    settings = root / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no news or update toasts over the page
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(root / ".settings"), JUPYTER_CONFIG_DIR=str(root / ".config"),
               JUPYTER_DATA_DIR=str(root / ".data"), JUPYTER_RUNTIME_DIR=str(root / ".runtime"),
               IPYTHONDIR=str(root / ".ipython"), JUPYTERLAB_WORKSPACES_DIR=str(root / ".workspaces"))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"]
    if os.getuid() == 0:
        cmd.append("--allow-root")
    log = open(root / "lab.log", "w")
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start:\n{(root / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"{base}/lab/tree/explorer.ipynb?token={token}"
    finally:
        server.terminate()  # shuts its kernel down too
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def wait_text(page, selector: str, pattern: str, timeout_s: float) -> str:
    """The text of `selector` once it matches `pattern`; fails on a shown error or at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = page.inner_text(selector)
        if re.search(pattern, text):
            return text
        status = page.inner_text(".ec-status")
        assert "Error" not in status, status
        assert time.monotonic() < deadline, f"{selector} never matched {pattern!r}; it shows {text!r}; status {status!r}"
        page.wait_for_timeout(250)


def column(rows, i):
    return [(r[2 * i], float(r[2 * i + 1])) for r in rows]


def test_an_edit_in_the_browser_shows_risk_predictions_collapse_and_undo(lab, smollm2):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    expected = predict_next(smollm2, TEXT, k=5)  # what the page must show before the edit
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.set_default_timeout(180_000)
        try:
            page.goto(lab)
            page.get_by_text(re.compile(r"\| Idle$")).wait_for()  # the kernel is up (status bar)
            page.locator(".jp-Notebook .jp-CodeCell .jp-InputArea-editor").first.click()
            page.keyboard.press("Shift+Enter")  # the parameters cell (model = ...)
            page.keyboard.press("Shift+Enter")  # the explorer cell
            page.locator(".ec-edit").wait_for(state="visible")
            output = page.locator(".jp-OutputArea", has=page.locator(".ec-edit"))

            for name in ("pick", "check", "edit", "undo"):  # no label cut short ("load CounterFact …")
                button = page.locator(f".ec-{name}")
                assert button.evaluate("e => e.scrollWidth <= e.clientWidth"), f"{button.inner_text()!r} is truncated"

            case = page.locator(".ec-case input")
            case.fill("946")
            case.press("Enter")
            page.locator(".ec-pick").click()
            wait_text(page, ".ec-status", r"case 946: Bay, which is located in \[Philippines → Italy\]", 60)
            assert page.locator(".ec-prompt input").input_value() == TEXT
            assert page.locator(".ec-subject input").input_value() == "Bay"
            assert page.locator(".ec-target input").input_value() == "Italy"

            # edit: the guard's risk appears while the edit still runs; progress names the phases
            statuses, risk_seen, disabled_seen = [], None, False
            t0 = time.perf_counter()
            page.locator(".ec-edit").click()
            while not page.inner_text(".ec-status").startswith("edit applied in"):
                status = page.inner_text(".ec-status")
                assert "Error" not in status, status
                if not statuses or statuses[-1] != status:
                    statuses.append(status)
                disabled_seen |= page.locator(".ec-edit").is_disabled()  # no second click while it runs
                if risk_seen is None and page.inner_text(".ec-risk"):
                    risk_seen = (time.perf_counter() - t0, page.inner_text(".ec-verdict"))
                assert time.perf_counter() - t0 < EDIT_TIMEOUT_S, f"no result after {EDIT_TIMEOUT_S} s: {statuses}"
                page.wait_for_timeout(200)
            click_to_result = time.perf_counter() - t0
            output.screenshot(path=ARTIFACTS / "explorer_edit.png")
            page.screenshot(path=ARTIFACTS / "explorer_edit_page.png")

            assert risk_seen is not None and risk_seen[1] == "", "the risk was not shown before the result"
            # phases of seconds are seen while they run (polled every 200 ms); the guard's read takes ~0.1 s on an
            # idle machine and may fall between two polls, so every phase is checked in the final breakdown
            assert any("loading model smollm2-135m" in s for s in statuses), statuses
            assert any("rome: optimising v*" in s for s in statuses), statuses
            assert any("measuring perplexity" in s for s in statuses), statuses
            assert disabled_seen and page.locator(".ec-edit").is_enabled()
            assert page.locator(".ec-progress").is_visible()
            status = page.inner_text(".ec-status")
            assert status.startswith("edit applied in"), status
            assert all(re.search(rf"{phase} [0-9.]+ s", status) for phase in ("model load", "guard", "edit", "perplexity")), status

            risk = page.inner_text(".ec-risk")
            m = re.search(r"guard: HIGH COLLAPSE RISK for rome: risk −log\(uᵀk\^u\) = (\S+) > threshold (\S+)", risk)
            assert m, risk
            assert float(m[1]) > float(m[2])

            verdict = page.inner_text(".ec-verdict")
            m = re.search(r"COLLAPSED: perplexity ([\d,.]+) > threshold ([\d,.]+) \(×([\d,.]+) the unedited ([\d,.]+)\)",
                          verdict)
            assert m, verdict
            ppl, threshold, ratio, ppl0 = (float(g.replace(",", "")) for g in m.groups())
            assert threshold == 1000.0 and ppl > threshold and ppl0 < threshold
            assert ratio == pytest.approx(ppl / ppl0, rel=0.01)
            assert page.locator(".ec-verdict div[style]").evaluate("e => getComputedStyle(e).backgroundColor") == \
                "rgb(198, 40, 40)"  # the red banner

            rows = [[c.inner_text() for c in r.locator("td").all()] for r in page.locator(".ec-table tr").all()[1:]]
            assert len(rows) == 5
            before, after = column(rows, 0), column(rows, 1)
            assert [t for t, _ in before] == [repr(t) for t, _ in expected]
            assert [p for _, p in before] == pytest.approx([p for _, p in expected], abs=2e-3)
            assert after != before
            chart = page.locator(".ec-chart")
            assert chart.is_visible() and chart.evaluate("e => e.naturalWidth") > 0

            page.locator(".ec-undo").click()
            undone = wait_text(page, ".ec-status", "edit undone", 120)
            assert f"top prediction {before[0][0]} again, as before the edit" in undone
            assert page.inner_text(".ec-verdict") == "" and not chart.is_visible()
            output.screenshot(path=ARTIFACTS / "explorer_undone.png")

            page.locator(".ec-check").click()  # the guard alone, on the unedited model: the same score
            wait_text(page, ".ec-status", "risk checked; the model is unedited", 120)
            assert page.inner_text(".ec-risk") == risk
        finally:
            page.screenshot(path=ARTIFACTS / "explorer_last.png")
            browser.close()
    timings = dict(click_to_result_s=round(click_to_result, 1), risk_shown_after_s=round(risk_seen[0], 1),
                   page_status=status, test_body_s=round(time.perf_counter() - t_start, 1),
                   loadavg=os.getloadavg(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=1))
    print(f"\nexplorer in Chromium: {timings}\nscreenshots: {ARTIFACTS}")
