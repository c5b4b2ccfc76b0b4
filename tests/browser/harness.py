"""Start the real web UI in a subprocess and drive it with Debian's Chromium through Playwright."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"


def have_chromium() -> bool:
    return Path(CHROMIUM).is_file() and shutil.which(CHROMIUM) is not None


# Every browser test is slow and needs Debian's chromium (Playwright's own browser download cannot work here).
BROWSER_MARKS = [pytest.mark.slow,
                 pytest.mark.skipif(not have_chromium(), reason="/usr/bin/chromium is not installed "
                                    "(apt-get install chromium); Playwright's own browser download is not used")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the UI exited with {proc.returncode} before answering on {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (e.g. 401 behind a login)
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the UI did not answer on {url} within {timeout:.0f} s")


def app_workspace(runs_dir: Path) -> Path:
    """The workspace of the app that `running_app(runs_dir)` starts: its own engine.json and uploads, the built
    demo models and caches shared."""
    from serve_fixtures import private_workspace

    return private_workspace(runs_dir.parent / "workspace")


@contextlib.contextmanager
def running_app(runs_dir: Path, *args: str, log: Path | None = None,
                env: dict[str, str] | None = None) -> Iterator[str]:
    """`python webui.py --port P --runs-dir R ...` until the block exits; yields the base URL."""
    port = free_port()
    full_env = {**os.environ, "GPTOSS_WORKSPACE": str(app_workspace(runs_dir)), "PYTHONUNBUFFERED": "1",
                "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    log = log or runs_dir.parent / "webui.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "webui.py"), "--port", str(port),
                                 "--runs-dir", str(runs_dir), *args],
                                cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop the UI and what it started in its session (the UI itself never stops runs on exit)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()


@contextlib.contextmanager
def browser_page(locale: str = "en-US") -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(locale=locale, viewport={"width": 1400, "height": 1000})
            yield context.new_page()
        finally:
            browser.close()


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def plotted_points(page, selector: str) -> int:
    """Points drawn on a gradio LinePlot (vega SVG): 0 unless the line itself has a stroke."""
    return page.evaluate("""(sel) => {
        const el = document.querySelector(sel);
        const line = el && el.querySelector('.mark-line path');
        if (!line || !line.getAttribute('stroke') || !(line.getAttribute('d') || '').length) return 0;
        const points = [...el.querySelectorAll("[aria-label^='step:']")];
        return new Set(points.map(e => e.getAttribute('aria-label'))).size;
    }""", selector)


def until(check, timeout_s: float, what: str = "condition") -> None:
    deadline = time.time() + timeout_s
    while not check():
        assert time.time() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.5)


def wait_text(page, selector: str, text: str, timeout_s: float = 30) -> str:
    """Wait until the element's visible text contains `text`; return that text."""
    page.wait_for_function("([sel, text]) => { const e = document.querySelector(sel); "
                           "return e && e.innerText.includes(text); }", arg=[selector, text],
                           timeout=timeout_s * 1000)
    return page.locator(selector).inner_text()
