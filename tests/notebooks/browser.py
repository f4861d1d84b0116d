"""Headless Chromium on a notebook in the classic Notebook UI (notebooks/server.py): helpers for
tests/notebooks/test_tfma_widget.py.

Debian's chromium and chromium-driver, driven by selenium from the lock, with both paths given
so that Selenium Manager never runs (nothing is downloaded). Offline, TFMA's widgets ask Google
for two things that fail: the Roboto fonts (Polymer) and the Google Charts loader
(`google-chart`); `unexpected_console_errors` names them and lets only those through.
"""

import contextlib
import os
import re
import socket
import subprocess
import time
import urllib.request

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver  (Debian, as root)"
# The requests that fail offline, by URL prefix: Polymer's Roboto fonts, Google Charts' loader.
EXPECTED_OFFLINE = ("https://fonts.googleapis.com/", "https://www.gstatic.com/charts/loader.js")
TFMA_ELEMENTS = {"slicing": "tfma-nb-slicing-metrics", "time_series": "tfma-nb-time-series",
                 "plot": "tfma-nb-plot"}
# Chromium logs an unhandled promise rejection whose reason is not an Error as a SEVERE entry with
# no text ("<page URL> 0:0 "): google-chart's loader promises, rejected with the failed <script>'s
# load-error Event. This script, run in every page before its own, records each rejection's
# reason and, for an Event, the URL of the element that failed, so that such entries are named.
REJECTION_RECORDER = """
window.__rejections = [];
window.addEventListener('unhandledrejection', (e) => {
  const r = e.reason, target = r && r.target;
  window.__rejections.push({reason: String(r), stack: (r && r.stack) || '',
                            url: (target && (target.src || target.href)) || ''});
});
"""
_NO_TEXT = re.compile(r"\S+ \d+:\d+\s*")


def require_chromium():
    """Skips (fails under CI=true) where Debian's chromium or chromium-driver is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        message = f"headless Chromium is missing ({', '.join(missing)}): {INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def notebook_server(root_dir, kernel_dir, log_path, timeout=90):
    """`notebooks.server.command(...)` (what `make notebooks` runs) on 127.0.0.1 and a free port,
    TFMA's nbextension enabled through `notebooks.server.enable()` first. Yields
    (base URL, token); stops the server on exit."""
    import secrets

    from notebooks import server
    server.enable()
    port, token = free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(server.command(root_dir, kernel_dir=kernel_dir, port=port,
                                               token=token, open_browser=False),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the notebook server did not start:\n"
                                           + open(log_path).read()[-3000:])
                    time.sleep(0.5)
            yield base, token
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def chromium(user_data_dir, width=1280, height=1400):
    """A headless Chromium session with the browser console log kept (goog:loggingPrefs)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                               {"source": REJECTION_RECORDER})
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script, timeout, what, *args):
    """Polls `script` (JavaScript returning a value) until it is truthy; returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(0.5)


_CELL = ("const cells = Jupyter.notebook.get_cells();"
         "const i = cells.findIndex(c => (c.metadata.tags || []).includes(arguments[0]));")


def open_notebook(driver, url, timeout=60):
    """Opens a notebook page of the classic UI and waits for its kernel; turns autosave off
    (the test changes nothing it should keep)."""
    driver.get(url)
    wait_for(driver, "return window.Jupyter && Jupyter.notebook && Jupyter.notebook._fully_loaded"
             " && Jupyter.notebook.kernel && Jupyter.notebook.kernel.is_connected()",
             timeout, "the notebook page and its kernel")
    driver.execute_script("Jupyter.notebook.set_autosave_interval(0)")


def run_cells_through(driver, tag, timeout=300):
    """Runs the notebook's cells from the first through the one tagged `tag`, in the browser,
    and waits for them. Fails with the traceback if one raised."""
    last = driver.execute_script(_CELL + "Jupyter.notebook.execute_cell_range(0, i + 1); return i;",
                                 tag)
    assert last >= 0, f"no cell tagged {tag!r}"
    # Done when each has its number, or when one failed (the rest then do not run).
    wait_for(driver, "const cells = Jupyter.notebook.get_cells().slice(0, arguments[0] + 1);"
             "return cells.every(c => c.cell_type !== 'code'"
             " || typeof c.input_prompt_number === 'number') || cells.some(c =>"
             " c.cell_type === 'code' && c.output_area.outputs.some("
             "o => o.output_type === 'error'))", timeout, f"cells 0..{last} executed", last)
    errors = driver.execute_script(
        "return Jupyter.notebook.get_cells().slice(0, arguments[0] + 1).flatMap((c, i) =>"
        " c.cell_type !== 'code' ? [] : c.output_area.outputs"
        ".filter(o => o.output_type === 'error').map(o => [i, o.ename, o.evalue]))", last)
    assert not errors, errors
    return last


_FRAME_TEXT = """
const out = [];
const walk = (n) => {
  if (n.nodeType === Node.TEXT_NODE) { const t = n.textContent.trim(); if (t) out.push(t); return; }
  if (n.nodeType === Node.ELEMENT_NODE && ['STYLE', 'SCRIPT', 'TEMPLATE'].includes(n.tagName)) return;
  if (n.tagName === 'INPUT' && n.value) out.push(n.value);
  if (n.shadowRoot) walk(n.shadowRoot);
  for (const c of n.childNodes) walk(c);
};
walk(arguments[0]);
return out;"""


def tfma_widget(driver, tag, element="tfma-nb-slicing-metrics", timeout=60):
    """TFMA's widget in the output of the cell tagged `tag`, once it carries data: the custom
    element `element` defined, present in that cell's output, and no "Error displaying widget"
    there. Returns {"element": WebElement, "cell": WebElement, "data": its data (JSON),
    "text": the output's text, "frame": the texts its Polymer frame draws (shadow DOMs
    included: pickers, their options, labels)}."""
    try:
        return _tfma_widget(driver, tag, element, timeout)
    except TimeoutError as e:
        errors = [x["message"] for x in console_log(driver) if x["level"] == "SEVERE"]
        raise AssertionError(f"{e}; the console's errors:\n" + "\n".join(errors)) from None


def _tfma_widget(driver, tag, element, timeout):
    found = wait_for(
        driver, _CELL + "if (i < 0) return {error: 'no cell tagged ' + arguments[0]};"
        "const out = cells[i].output_area.element[0];"
        "const text = out.innerText;"
        "if (text.includes('Error displaying widget')) return {error: text};"
        "if (!customElements.get(arguments[1])) return null;"
        "const el = out.querySelector(arguments[1]);"
        "if (!el || !el.data || !el.data.length) return null;"
        "return {element: el, cell: cells[i].element[0], text: text,"
        " data: JSON.parse(JSON.stringify(el.data))};",
        timeout, f"{element} defined, with data, in the output of the cell tagged {tag!r}",
        tag, element)
    assert "error" not in found, found["error"]
    found["frame"] = driver.execute_script(_FRAME_TEXT, found["element"])
    return found


def metric_values(row) -> dict:
    """{metric name: value} of one slice of TFMA's UI data: its metrics are nested by output
    name and sub key ("" and "" for this model); names are joined with "/" where those are set."""
    values = {}
    for output, by_key in row["metrics"].items():
        for sub_key, metrics in by_key.items():
            for name, value in metrics.items():
                full = "/".join(part for part in (output, sub_key, name) if part)
                values[full] = value.get("doubleValue", value) if isinstance(value, dict) else value
    return values


def check_slicing_metrics(widget, expected, rel=1e-6, abs=None):
    """The slicing-metrics widget carries exactly the slices of `expected`
    ({slice, e.g. "label:3": {metric name: value}}), each with exactly those metric names and
    values, and its frame offers each metric name (the "Show" picker). Returns what it
    carries, in the same form."""
    shown = {row["slice"]: metric_values(row) for row in widget["data"]}
    names = {name for metrics in expected.values() for name in metrics}
    assert "Slices Overview" in widget["frame"] and names <= set(widget["frame"]), widget["frame"]
    assert sorted(shown) == sorted(expected)
    for name, metrics in expected.items():
        assert sorted(shown[name]) == sorted(metrics), (name, sorted(shown[name]))
        for metric, value in metrics.items():
            assert shown[name][metric] == pytest.approx(value, rel=rel, abs=abs), (name, metric)
    return shown


def console_log(driver):
    """The browser console's entries since the session started (get_log returns each once)."""
    if not hasattr(driver, "console_entries"):
        driver.console_entries = []
    driver.console_entries += driver.get_log("browser")
    return driver.console_entries


def unexpected_console_errors(driver, expected=EXPECTED_OFFLINE):
    """The browser console's SEVERE entries since the start, less the failed requests to the URLs in
    `expected` (prefixes) and the textless entries of as many unhandled rejections recorded for
    those requests (REJECTION_RECORDER). Returns (unexpected, expected_seen)."""
    def named(url):
        return any(url.startswith(prefix) for prefix in expected)

    rejections = driver.execute_script("return window.__rejections || []")
    explained = [r["url"] for r in rejections if named(r["url"])]
    unexpected = [f"unhandled rejection: {r['reason']} {r['url']} {r['stack']}"
                  for r in rejections if not named(r["url"])]
    seen = []
    for entry in console_log(driver):
        if entry["level"] != "SEVERE":
            continue
        message = entry["message"]
        if any(prefix in message for prefix in expected):
            seen.append(message)
        elif _NO_TEXT.fullmatch(message) and explained:
            seen.append(f"{message.rstrip()} (unhandled rejection: {explained.pop(0)} failed)")
        else:
            unexpected.append(message)
    return unexpected, seen
