"""The whole path through the real page: the demo preset -> train -> progress and loss curve -> serve the
result (merged on the CPU, auto mode) -> a streamed chat answer in the trained voice -> Chinese labels.
Screenshots go to test-artifacts/ (the README's come from here).

About 5-7 minutes on 2 CPU cores: a real deepspeed run (the preset's 40 steps) and a real vLLM engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

from .harness import (
    BROWSER_MARKS,
    app_workspace,
    browser_page,
    free_port,
    plotted_points,
    running_app,
    shot,
    until,
    wait_text,
)

pytestmark = BROWSER_MARKS

RUN = "ui-e2e"
STEPS = 40  # the tiny-cpu-demo preset's max_steps: enough for the adapter to answer in the data's voice
BOT = "#gw-chatbot .message.bot"  # the assistant's bubbles (the reasoning block is one too)


def _box(page, elem_id: str):
    """The text/number box inside a gradio component."""
    return page.locator(f"#{elem_id}").locator("input, textarea").first


def _kill_leftovers(runs: Path) -> None:
    """Runs and the engine live in their own sessions (they outlive the UI by design): end ours."""
    pgids = []
    for status in runs.glob("*/status.json"):
        pgids.append(json.loads(status.read_text()).get("pgid"))
    engine = app_workspace(runs) / "engine.json"
    if engine.is_file():
        pgids.append(json.loads(engine.read_text()).get("pid"))
    for pgid in filter(None, pgids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def test_train_serve_chat_in_the_browser(tmp_path):
    runs = tmp_path / "runs"
    t0 = time.time()
    try:
        with running_app(runs) as url, browser_page() as page:
            page.goto(url)
            page.wait_for_selector("#gw-estimate")
            assert "CPU" in page.locator("#gw-hardware").inner_text()

            # --- Train: the preset, a short run through the form --------------------------------------
            page.get_by_label("Preset").click()
            page.get_by_role("option", name="tiny-cpu-demo").click()
            assert _box(page, "gw-train-max_steps").input_value() == str(STEPS)
            _box(page, "gw-train-run_name").fill(RUN)
            _box(page, "gw-train-run_name").press("Tab")
            page.get_by_role("button", name="Show command").click()
            page.wait_for_function("() => document.querySelector('#gw-start') && "
                                   "!document.querySelector('#gw-start').disabled")
            wait_text(page, "body", f"max_steps: {STEPS}", 30)
            assert "python -m gptoss_webui train --config" in wait_text(page, "#gw-cmd-line", "--config", 10)
            page.get_by_role("button", name="Preview an example").click()
            wait_text(page, "body", "tokens the loss is computed on", 120)
            shot(page, "e2e-1-form")

            page.locator("#gw-start").click()
            wait_text(page, "#gw-run-state", RUN, 180)
            wait_text(page, "#gw-progress", f"/ {STEPS}", 300)  # the first step event (after the JIT compile)
            wait_text(page, "#gw-run-state", "finished", 600)
            wait_text(page, "#gw-progress", f"Step {STEPS} / {STEPS}", 30)
            until(lambda: plotted_points(page, "#gw-loss-plot") >= 10, 30)
            assert "tokens/s" in page.locator("#gw-metrics").inner_text()
            assert "launch.py" in _box(page, "gw-log").input_value()  # DeepSpeed's launcher, in train.log
            shot(page, "e2e-2-trained")
            print(f"trained after {time.time() - t0:.0f} s")

            # --- Serve: the finished run, auto mode (merges on the CPU) --------------------------------
            page.locator("#gw-tab-serve-button").click()
            _box(page, "gw-serve-port").fill(str(free_port()))
            page.get_by_label("Finished run").click()
            page.get_by_role("option", name=RUN).click()
            page.locator("#gw-serve-run-btn").click()
            state = wait_text(page, "#gw-engine-state", "Engine running", 420)
            assert "merged" in state.lower() or RUN in state
            assert _box(page, "gw-base-url").input_value().endswith("/v1")
            wait_text(page, "#gw-adapters", RUN, 10)
            shot(page, "e2e-3-serving")
            print(f"serving after {time.time() - t0:.0f} s")

            # --- Chat: a streamed answer from the served run --------------------------------------------
            page.locator("#gw-tab-chat-button").click()
            page.wait_for_function("(name) => document.querySelector('#gw-chat-model input')?.value === name",
                                   arg=RUN, timeout=30000)
            # Record every state the assistant's bubble goes through, to see the answer arrive in pieces.
            page.evaluate("""(bot) => {
                window.gwSeen = new Set();
                const root = document.querySelector('#gw-chatbot');
                const record = () => window.gwSeen.add(
                    [...root.querySelectorAll(bot)].map(e => e.innerText.trim()).join('|'));
                const opts = {subtree: true, childList: true, characterData: true};
                new MutationObserver(record).observe(root, opts);
            }""", BOT)
            _box(page, "gw-chat-input").fill("What is the capital of France?")
            page.locator("#gw-chat-send").click()
            until(lambda: page.locator(BOT).count() >= 1, 120, "an assistant message")
            # The answer streams in pieces ("Ah", "oy", ...): wait for the whole trained opening.
            with contextlib.suppress(Exception):
                page.wait_for_function("(sel) => [...document.querySelectorAll(sel)]"
                                       ".map(e => e.innerText).join('').includes('Ahoy, matey!')",
                                       arg=BOT, timeout=120000)
            answer = " ".join(page.locator(BOT).all_inner_texts()).strip()
            states = [x for x in page.evaluate("() => [...window.gwSeen]") if x and x != "…"]
            assert len(states) >= 2, (answer, states)  # it grew while streaming
            assert answer.startswith("Ahoy, matey!"), answer  # the voice the demo data trains
            shot(page, "e2e-4-chat")

            # --- Language: every label follows ----------------------------------------------------------
            page.get_by_text("简体中文").click()
            wait_text(page, "#gw-tab-train-button", "训练", 30)
            assert page.locator("#gw-tab-serve-button").inner_text().strip() == "部署"
            assert "发送" in page.locator("#gw-chat-send").inner_text()
            assert "温度" in page.locator("body").inner_text()
            shot(page, "e2e-5-zh")
            page.locator("#gw-tab-train-button").click()
            assert "开始训练" in page.locator("#gw-start").inner_text()
            assert "已完成" in page.locator("#gw-run-state").inner_text()

            # --- Stop the engine from the page ----------------------------------------------------------
            page.locator("#gw-tab-serve-button").click()
            page.locator("#gw-engine-stop").click()
            wait_text(page, "#gw-engine-state", "引擎已停止", 60)
            print(f"done after {time.time() - t0:.0f} s")
    finally:
        _kill_leftovers(runs)
