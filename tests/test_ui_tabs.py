"""The tabs' pure parts without a browser: the memory gate, the command, progress text, the page build."""

from __future__ import annotations

import pytest

from gptoss_webui.presets import load_preset
from gptoss_webui.ui import runview
from gptoss_webui.ui.i18n import table

gr = pytest.importorskip("gradio")

from gptoss_webui.ui import train_tab  # noqa: E402  (needs gradio)


def test_the_gate_refuses_what_does_not_fit_and_says_why(tmp_path):
    recipe = load_preset("gpt-oss-20b-2x24gb", ["train.base_weights=bf16"])
    head, report, ok, reason, fix = train_tab.estimate_view(recipe, force=False, lang="en")
    assert not ok and "Does not fit" in head and "23.5 GiB" in head
    assert "Start is disabled" in reason and "Suggested fix" in head
    assert "train.base_weights=mxfp4" in fix and "GPU memory" in report
    _, _, ok, reason, _ = train_tab.estimate_view(recipe, force=True, lang="zh")
    assert ok and reason == table("zh")["train.forced"]
    _, _, ok, _, fix = train_tab.estimate_view(load_preset("gpt-oss-20b-2x24gb"), force=False, lang="en")
    assert ok and fix == []


def test_show_command_is_the_yaml_start_writes_and_the_cli_line(tmp_path):
    recipe = load_preset("tiny-cpu-demo", ["train.run_name=r1", "train.optim.max_steps=6"])
    yaml_text, line = train_tab.command_view(recipe, str(tmp_path))
    assert "max_steps: 6" in yaml_text
    assert line.startswith("python -m gptoss_webui train --config") and f"{tmp_path}/r1/config.yaml" in line


def test_progress_texts_in_both_languages():
    v = runview.RunView("r", "running", step=3, total=6, loss=1.5, lr=1e-3, tokens_per_s=1234.0,
                        peak_mem_gib=2.0, elapsed_s=30, eta_s=30, eval_losses=[(3, 1.7)])
    assert 'style="width:50%"' in train_tab.progress_html(v, "en") and "Step 3 / 6" in train_tab.progress_html(v, "en")
    assert "第 3 / 6 步" in train_tab.progress_html(v, "zh") and "预计剩余 0:30" in train_tab.progress_html(v, "zh")
    assert "1,234 tokens/s" in train_tab.metrics_md(v, "en") and "eval loss **1.7000**" in train_tab.metrics_md(v, "en")
    failed = runview.RunView("r", "failed", error="boom")
    assert "失败" in train_tab.state_md(failed, "zh") and "boom" in train_tab.state_md(failed, "zh")


def test_the_page_builds_and_every_label_switches_language(tmp_path):
    from gptoss_webui.ui.i18n import Localizer
    from gptoss_webui.ui.page import build_page

    demo = build_page(str(tmp_path), "zh")
    assert all(fn.api_visibility == "private" for fn in demo.fns.values())
    L = Localizer("en")
    with gr.Blocks():
        train_tab.build(L, gr.Radio(["en", "zh"], value="en"), str(tmp_path))
    updates = L.updates("zh")
    assert len(updates) == len(L.components) > 40
    assert all(all(isinstance(v, str) and v for k, v in u.items() if k != "__type__") for u in updates)


def test_chat_reasoning_is_a_collapsed_block_apart_from_the_answer():
    from gptoss_webui.ui.chat_tab import render

    turns = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": "Ahoy!", "reasoning": "Greet like a pirate."}]
    shown = render(turns, "zh")
    assert shown[1] == {"role": "assistant", "content": "Greet like a pirate.",
                        "metadata": {"title": "推理过程", "status": "done"}}
    assert shown[2] == {"role": "assistant", "content": "Ahoy!"}
    pending = render([turns[0], {"role": "assistant", "content": ""}], "en", pending=True)
    assert pending[-1]["content"] == "…"
    assert "no final answer" in render([turns[0], {"role": "assistant", "content": ""}], "en")[-1]["content"]


def test_a_restarted_ui_reattaches_to_a_running_engine(tmp_path, monkeypatch):
    """The engine outlives the UI; a new UI process reads the workspace's engine.json and shows it running."""
    import json
    import subprocess
    import sys

    import psutil

    from gptoss_webui.ui import engine_ctl, serve_tab

    monkeypatch.setenv("GPTOSS_WORKSPACE", str(tmp_path))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "engine.json").write_text(json.dumps({
            "state": "running", "model": "/m", "model_spec": "demo:tiny-gpt-oss", "served_name": "my-run",
            "port": 8123, "pid": sleeper.pid, "create_time": psutil.Process(sleeper.pid).create_time(),
            "merged_from": {"my-run": "/runs/my-run/adapter"}, "lora_note": "adapter merged into the weights"}))
        engine_ctl._controls.clear()  # as in a fresh UI process
        snap = engine_ctl.control_for().snapshot()
        assert snap.state == "running" and snap.info.base_url == "http://127.0.0.1:8123/v1"
        assert "my-run" in serve_tab.engine_md(snap, "en") and "my-run" in serve_tab.adapters_md(snap, "en")
        assert serve_tab.served_model(snap.info) == "/m"  # the merged folder it loads, not the base
    finally:
        sleeper.kill()
        sleeper.wait()
    # Gone while nobody watched: reported as failed, with the reason, in the page's language.
    engine_ctl._controls.clear()
    snap = engine_ctl.control_for().snapshot()
    assert snap.state == "crashed" and "引擎出错" in serve_tab.engine_md(snap, "zh")


def test_the_page_builds_with_a_widget_for_every_form_field(tmp_path):
    """Every FIELDS entry must be placed on the Train tab (a field left out only failed in the browser)."""
    from gptoss_webui.ui.app import build_app

    assert build_app(str(tmp_path / "runs"), lang="en") is not None


# --- what the pipeline says, in the page's language ------------------------------------------------------------

def test_the_estimate_is_worded_in_the_page_language():
    recipe = load_preset("gpt-oss-20b-2x24gb", ["train.base_weights=bf16"])
    head, report, *_ = train_tab.estimate_view(recipe, force=False, lang="zh")
    assert "放不下" in head and "专家保持 MXFP4 格式（base_weights bf16 -> mxfp4）" in head  # the cheapest fix
    for words in ("基础权重", "LoRA 权重 + 梯度 + Adam", "保存的激活", "合计", "GPU 显存", "每张 GPU：2 张 GPU，ZeRO-2",
                  "放不下：每张 GPU 需要", "代价最小的改法：专家保持 MXFP4 格式"):
        assert words in report, words
    assert not any(words in report for words in ("base weights", "does not fit", "cheapest fix", "per GPU"))
    # The breakdown stays a table in monospace: every amount starts in the same column, CJK counted double.
    from gptoss_webui.train.memory import _width

    rows = [line for line in report.splitlines() if line.startswith("  ") and "GiB)" not in line]
    assert len(rows) > 6 and len({_width(line[:line.index(" GiB")]) for line in rows}) == 1, rows
    en_head, en_report, *_ = train_tab.estimate_view(recipe, force=False, lang="en")
    assert "keep the experts in MXFP4 (base_weights bf16 -> mxfp4)" in en_head and "cheapest fix" in en_report

    too_long = load_preset("gpt-oss-20b-1xh100", ["train.data.max_length=131072"])
    head, *_ = train_tab.estimate_view(too_long, force=False, lang="zh")
    assert "放得下的最长 max_length：" in head  # what would fit, all else kept
    hopeless = load_preset("gpt-oss-20b-1x16gb", ["train.gpu_memory_gib=2"])
    head, report, ok, *_ = train_tab.estimate_view(hopeless, force=False, lang="zh")
    assert not ok and "这里尝试过的改动都放不下（需要 4 位专家/QLoRA 或显存更大的显卡）" in head


def test_a_queued_runs_place_is_worded_in_the_page_language(tmp_path):
    import subprocess
    import sys
    import time

    import psutil

    from gptoss_webui.runs import RunsDir

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        created = psutil.Process(sleeper.pid).create_time()
        for name, state in (("holder", "running"), ("waiting", "queued")):
            run = RunsDir(tmp_path).create(name)
            run.config_path.write_text("train: {}\n")
            run.write_status(state=state, pid=sleeper.pid, pgid=sleeper.pid, create_time=created, gpus=[5],
                             queued_at=time.time())
        v = runview.view(run)
        assert ("正在排队等待 GPU 5，前面是：运行 holder（GPU 5）；资源空出后自动开始"
                in train_tab.state_md(v, "zh"))
        assert "queued for GPUs 5, behind run holder (GPUs 5); it starts by itself" in train_tab.state_md(v, "en")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_data_and_launch_errors_are_worded_in_the_page_language(tmp_path):
    from gptoss_webui.paths import workspace_dir
    from gptoss_webui.ui.form import form_values

    runs = str(tmp_path / "runs")
    missing = workspace_dir() / "data" / "missing.jsonl"
    recipe = load_preset("tiny-cpu-demo", [f"train.data.path={missing}"])
    _, said = train_tab.on_preview(runs, "zh", recipe.model_dump(mode="json"), "", *form_values(recipe))
    assert said == f"❌ 预览失败：找不到数据集文件：{missing}"
    recipe = load_preset("tiny-cpu-demo", ["train.deepspeed.offload_optimizer=true"])
    _, reason = train_tab.on_start(runs, "zh", False, recipe.model_dump(mode="json"), "", *form_values(recipe))
    assert reason.startswith("❌ 无法开始：deepspeed.offload_optimizer 把优化器状态从 GPU 显存移到 CPU 内存")


def test_row_lora_and_config_errors_are_worded_in_the_page_language(tmp_path):
    """A bad data row (with its line), a LoRA target and a config value the form cannot take read in Chinese."""
    from gptoss_webui.paths import workspace_dir
    from gptoss_webui.ui.form import form_values

    runs = str(tmp_path / "runs")
    bad = workspace_dir() / "data" / "uploads" / f"bad-row-{tmp_path.name}.jsonl"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text('{"messages": [{"role": "assistant", "content": "a"}]}\n{"messages": oops}\n', encoding="utf-8")
    try:
        recipe = load_preset("tiny-cpu-demo", [f"train.data.path={bad}", "train.data.max_samples=2"])
        _, said = train_tab.on_start(runs, "zh", False, recipe.model_dump(mode="json"), "", *form_values(recipe))
    finally:
        bad.unlink()
    assert said.startswith(f"❌ 无法开始：{bad} 第 2 行：不是有效的 JSON（第 14 列：Expecting value）"), said

    recipe = load_preset("tiny-cpu-demo", ["train.lora.target_modules=[q_proj,query]"])
    _, said = train_tab.on_start(runs, "zh", False, recipe.model_dump(mode="json"), "", *form_values(recipe))
    assert "未知的 LoRA 目标模块 ['query']；此模型的线性模块有：" in said, said

    recipe = load_preset("tiny-cpu-demo")
    gate = train_tab.refresh(runs, "zh", False, recipe.model_dump(mode="json"), "lora.r=0\nlora.bogus=1",
                             *form_values(recipe))
    assert "表单：字段 train.lora.r：输入应大于或等于 1" in gate[0], gate[0]
    assert "字段 train.lora.bogus：未知字段；此处允许的字段：r, alpha, dropout" in gate[0], gate[0]


def test_the_serve_tab_shows_the_served_model_and_compare_never_pits_a_model_against_itself():
    from gptoss_webui.serve.state import EngineInfo
    from gptoss_webui.ui.chat_tab import compare_choices
    from gptoss_webui.ui.serve_tab import served_model

    hot = EngineInfo(model="/ws/models/tiny-gpt-oss", model_spec="demo:tiny-gpt-oss", served_name="tiny-gpt-oss",
                     adapters={"pirate": "/runs/pirate/adapter"})
    assert served_model(hot) == "demo:tiny-gpt-oss"  # the base as given; the adapters are listed below it
    merged = EngineInfo(model="/runs/pirate/merged", model_spec="demo:tiny-gpt-oss", served_name="pirate",
                        merged_from={"pirate": "/runs/pirate/adapter"})
    assert served_model(merged) == "/runs/pirate/merged"

    assert compare_choices(merged.model_names, None, None) == ([], None, [], None)  # one model: nothing to compare
    names = hot.model_names
    assert compare_choices(names, None, None) == (names, "tiny-gpt-oss", ["pirate"], "pirate")
    assert compare_choices(names, "pirate", "pirate") == (names, "pirate", ["tiny-gpt-oss"], "tiny-gpt-oss")
    three = [*names, "sailor"]
    assert compare_choices(three, "pirate", "tiny-gpt-oss") == (three, "pirate", ["tiny-gpt-oss", "sailor"],
                                                                "tiny-gpt-oss")
