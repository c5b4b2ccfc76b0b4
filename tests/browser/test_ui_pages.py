"""The page against the real app (fast cases, no training): the memory gate, reattaching, login.

Each test starts `python webui.py` in a subprocess and drives it with Debian's Chromium.
"""

from __future__ import annotations

import subprocess
import sys

from gptoss_webui.events import EventWriter
from gptoss_webui.runs import RunsDir

from .harness import (
    BROWSER_MARKS,
    browser_page,
    plotted_points,
    running_app,
    shot,
    until,
    wait_text,
)

pytestmark = BROWSER_MARKS


def test_estimate_refusal_disables_start_with_the_reason(tmp_path):
    with running_app(tmp_path / "runs") as url, browser_page() as page:
        page.goto(url)
        page.wait_for_selector("#gw-estimate")
        page.get_by_label("Preset").click()
        page.get_by_role("option", name="gpt-oss-20b-2x24gb").click()
        wait_text(page, "#gw-estimate", "Fits")  # the preset as shipped (ZeRO-2, MXFP4 experts) fits 23.5 GiB
        assert page.locator("#gw-start").is_enabled()
        # bf16 experts: ZeRO-2 keeps a full bf16 copy (37.9 GiB) on each 23.5 GiB card: refused, with a fix.
        page.locator("#gw-train-base_weights label", has_text="bf16").click()
        text = wait_text(page, "#gw-estimate", "Does not fit")
        assert "23.5 GiB" in text and "Suggested fix" in text
        assert "not fit" in wait_text(page, "#gw-start-reason", "disabled")
        page.wait_for_function("() => document.querySelector('#gw-start').disabled")
        shot(page, "estimate-refused")
        # Force lets it through (the launcher is still told force=True); the fix makes it fit again.
        page.get_by_label("Force").check()
        page.wait_for_function("() => !document.querySelector('#gw-start').disabled")
        assert "Forced" in page.locator("#gw-start-reason").inner_text()
        page.get_by_label("Force").uncheck()
        page.locator("#gw-apply-fix").click()
        wait_text(page, "#gw-estimate", "Fits")
        page.wait_for_function("() => !document.querySelector('#gw-start').disabled")


def test_the_estimate_speaks_the_page_language(tmp_path):
    """A Chinese browser gets the pipeline's verdict, its cheapest fix and the breakdown in Chinese."""
    with running_app(tmp_path / "runs") as url, browser_page(locale="zh-CN") as page:
        page.goto(url)
        wait_text(page, "#gw-tab-train-button", "训练")
        page.get_by_label("预设").click()
        page.get_by_role("option", name="gpt-oss-20b-2x24gb").click()
        wait_text(page, "#gw-estimate", "放得下")
        page.locator("#gw-train-base_weights label", has_text="bf16").click()
        text = wait_text(page, "#gw-estimate", "放不下")
        assert "专家保持 MXFP4 格式（base_weights bf16 -> mxfp4）" in text  # the fix, worded by train/memory.py
        page.get_by_text("显存明细").click()
        breakdown = wait_text(page, "#gw-breakdown", "基础权重")
        assert "代价最小的改法" in breakdown and "cheapest fix" not in breakdown
        shot(page, "estimate-zh")


def test_a_finished_runs_log_box_shows_its_last_lines(tmp_path):
    """The Log box holds the end of train.log and is scrolled to its last line (it used to stay at the top of the
    tail, showing lines from the middle of the run)."""
    run = RunsDir(tmp_path / "runs").create("done-run")
    run.config_path.write_text("train: {}\n")
    run.write_status(state="finished")
    run.log_path.write_text("".join(f"step {i}: loss {3 - i / 500:.3f}\n" for i in range(400)) + "the last line\n")
    with running_app(tmp_path / "runs") as url, browser_page() as page:
        page.goto(url)
        box = "#gw-log textarea"
        page.wait_for_function("(sel) => (document.querySelector(sel)?.value || '').endsWith('the last line\\n')",
                               arg=box, timeout=60000)
        page.wait_for_function("(sel) => { const t = document.querySelector(sel); "
                               "return t.scrollHeight > 2 * t.clientHeight "
                               "&& t.scrollTop + t.clientHeight >= t.scrollHeight - 2; }", arg=box, timeout=10000)


def _fake_running_run(runs_dir, pid: int):
    """A run folder as the launcher leaves it, owned by a live process (no deepspeed needed)."""
    run = RunsDir(runs_dir).create("live-run")
    run.config_path.write_text("train: {}\n")
    run.write_status(state="running", pid=pid, pgid=pid)
    w = EventWriter(run.events_path)
    w.emit("start", world_size=1, model="demo:tiny-gpt-oss", trainable_params=10, total_params=100,
           total_steps=10, resumed_from_step=0, config={})
    run.log_path.write_text("worker says hello\n")
    return run, w


def _step(w: EventWriter, step: int) -> None:
    w.emit("step", step=step, total=10, epoch=step / 10, loss=3.0 - step / 10, lr=1e-3, grad_norm=1.0,
           tokens_per_s=123.0, peak_mem_gib=1.0, elapsed_s=step, eta_s=10 - step)


def test_reload_and_restart_reattach_to_a_running_run(tmp_path):
    runs = tmp_path / "runs"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        run, w = _fake_running_run(runs, sleeper.pid)
        for s in (1, 2, 3):
            _step(w, s)
        with running_app(runs) as url, browser_page() as page:
            page.goto(url)
            wait_text(page, "#gw-run-state", "live-run")
            assert "running" in page.locator("#gw-run-state").inner_text()
            wait_text(page, "#gw-progress", "Step 3 / 10")
            assert page.locator("#gw-stop").is_enabled()
            _step(w, 4)  # the page follows the folder on its timer
            wait_text(page, "#gw-progress", "Step 4 / 10")
            page.reload()
            wait_text(page, "#gw-progress", "Step 4 / 10")
            assert "worker says hello" in page.locator("#gw-log textarea").input_value()
        _step(w, 5)  # while no UI runs at all
        with running_app(runs) as url, browser_page() as page:  # a restarted UI finds it again
            page.goto(url)
            wait_text(page, "#gw-progress", "Step 5 / 10")
            until(lambda: plotted_points(page, "#gw-loss-plot") >= 5, 30)
            sleeper.kill()
            sleeper.wait()
            # The process vanished without a final event: the run shows as failed and can be resumed.
            wait_text(page, "#gw-run-state", "failed")
            page.wait_for_function("() => !document.querySelector('#gw-resume').disabled")
            shot(page, "reattached")
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_stop_from_the_page_stops_the_run(tmp_path):
    """Stop says it is stopping (the wait for the ranks runs in the background); the page then shows it stopped."""
    runs = tmp_path / "runs"
    # Its own process group, as the launcher's supervisor: with no rank yet, stop ends the whole group.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        run, w = _fake_running_run(runs, sleeper.pid)
        _step(w, 1)
        with running_app(runs) as url, browser_page() as page:
            page.goto(url)
            wait_text(page, "#gw-run-state", "running")
            page.locator("#gw-stop").click()
            page.get_by_text("Stopping live-run").wait_for(timeout=10000)
            wait_text(page, "#gw-run-state", "stopped")
            assert sleeper.wait(timeout=10) is not None
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_public_bind_requires_login(tmp_path):
    runs = tmp_path / "runs"
    with running_app(runs, "--host", "0.0.0.0", "--auth", "ann:s3cret-pw") as url, browser_page() as page:
        page.goto(url)
        page.wait_for_selector("input[type=password]", timeout=30000)
        assert page.locator("#gw-estimate").count() == 0
        assert "gpt-oss WebUI" in page.content() and "/on_start" not in page.content()  # no endpoint list
        for password in ("wrong", "s3cret-pw"):
            page.locator("input[type=text]").first.fill("ann")
            page.locator("input[type=password]").fill(password)
            page.locator("input[type=password]").press("Enter")
            if password == "wrong":
                page.wait_for_selector("text=Incorrect", timeout=10000)
                assert page.locator("#gw-estimate").count() == 0
        page.wait_for_selector("#gw-estimate", timeout=30000)
        assert "s3cret-pw" not in page.content()
    assert "s3cret-pw" not in (tmp_path / "webui.log").read_text()


def test_paths_outside_the_workspace_are_refused_in_every_field_and_nothing_is_shown(tmp_path):
    """Typed as a user would: the dataset, the model, `hostfile=` in More settings (DeepSpeed once printed that
    file's text into the Log box) and the Serve tab's model. Each is refused, and not a line of the file appears."""
    secret = "root:x:0:0"
    with running_app(tmp_path / "runs") as url, browser_page() as page:
        page.goto(url)
        page.wait_for_selector("#gw-estimate")
        ok = "Needs about"  # the demo preset's estimate on a host without a GPU
        wait_text(page, "#gw-estimate", ok, 60)
        for elem_id, key in (("gw-train-data_path", "train.data.path"), ("gw-train-model", "train.model")):
            box = page.locator(f"#{elem_id} input")
            before = box.input_value()
            box.fill("/etc/passwd")
            box.press("Enter")
            wait_text(page, "#gw-estimate", f"{key}: /etc/passwd: the web UI only reads files inside", 30)
            page.wait_for_function("() => document.querySelector('#gw-start').disabled")
            page.get_by_role("button", name="Preview an example").click()
            page.wait_for_timeout(1500)
            assert secret not in page.locator("body").inner_text()
            box.fill(before)
            box.press("Enter")
            wait_text(page, "#gw-estimate", ok, 30)
        extra = page.get_by_placeholder("optim.warmup_ratio=0.1")
        extra.click()
        extra.press_sequentially("hostfile=/etc/passwd")
        wait_text(page, "#gw-estimate", "train.hostfile: /etc/passwd: the web UI only reads files inside", 30)
        page.wait_for_function("() => document.querySelector('#gw-start').disabled")
        page.locator("#gw-tab-serve-button").click()
        model = page.locator("#gw-serve-model input")
        model.fill("/etc")
        model.press("Enter")
        page.locator("#gw-engine-start").click()
        wait_text(page, "body", "serve.model: /etc: the web UI only reads files inside", 30)
        assert "starting" not in page.locator("#gw-engine-state").inner_text().lower()
        assert secret not in page.locator("body").inner_text()
        shot(page, "outside-paths-refused")
