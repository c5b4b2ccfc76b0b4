"""What the Train tab shows comes from the run folder alone (so reloads and restarts lose nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

from gptoss_webui.events import EventWriter
from gptoss_webui.runs import RunsDir
from gptoss_webui.ui import runview


def _fake_run(root, name: str, pid: int | None, state: str = "running"):
    run = RunsDir(root).create(name)
    run.config_path.write_text("train: {}\n")
    run.write_status(state=state, pid=pid, pgid=pid)
    return run


def test_view_follows_the_events_incrementally(tmp_path):
    run = _fake_run(tmp_path, "r1", None, state="finished")
    w = EventWriter(run.events_path)
    w.emit("start", world_size=1, model="m", trainable_params=1, total_params=2, total_steps=4,
           resumed_from_step=0, config={})
    w.emit("step", step=1, total=4, epoch=0.25, loss=2.0, lr=1e-3, grad_norm=1, tokens_per_s=100.0,
           peak_mem_gib=1.5, elapsed_s=3, eta_s=9)
    v = runview.view(run)
    assert (v.step, v.total, v.losses) == (1, 4, [(1, 2.0)]) and v.fraction == 0.25
    for step in (2, 3, 4):
        w.emit("step", step=step, total=4, epoch=step / 4, loss=2.0 - step / 10, lr=1e-3, grad_norm=1,
               tokens_per_s=100.0, peak_mem_gib=1.5, elapsed_s=3 * step, eta_s=0)
    w.emit("eval", step=4, eval_loss=1.9)
    w.emit("done", step=4, adapter_path="a", elapsed_s=12)
    v = runview.view(run)
    assert [s for s, _ in v.losses] == [1, 2, 3, 4] and v.eval_losses == [(4, 1.9)]
    assert v.final["type"] == "done" and not v.can_stop and not v.can_resume
    frame = runview.loss_frame(v)
    assert list(frame.columns) == ["step", "loss"] and len(frame) == 4
    assert str(runview.loss_frame(runview.RunView("x", "created")).dtypes["loss"]) == "float64"


def test_a_resumed_run_drops_the_points_it_rewinds(tmp_path):
    run = _fake_run(tmp_path, "r2", None, state="stopped")
    w = EventWriter(run.events_path)
    for step in (1, 2, 3):
        w.emit("step", step=step, total=6, loss=3.0, tokens_per_s=1.0)
    w.emit("stopped", step=3, checkpoint=None)
    w.emit("start", world_size=1, model="m", trainable_params=1, total_params=2, total_steps=6,
           resumed_from_step=2, config={})
    w.emit("step", step=3, total=6, loss=2.5, tokens_per_s=1.0)
    v = runview.view(run)
    assert v.losses == [(1, 3.0), (2, 3.0), (3, 2.5)] and v.final is None


def test_reattach_prefers_a_running_run(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _fake_run(tmp_path, "live", sleeper.pid)
        newer = _fake_run(tmp_path, "newer", None, state="finished")
        (newer.path / "config.yaml").touch()
        assert runview.pick_default(tmp_path) == "live"
    finally:
        sleeper.kill()
        sleeper.wait()
    # With the process gone, the launcher records the run as failed; the newest run is picked.
    assert runview.run_state(RunsDir(tmp_path).get("live")) == "failed"
    assert runview.pick_default(tmp_path) in ("newer", "live")
    assert runview.pick_default(tmp_path / "none") is None


def test_log_tail_keeps_whole_lines(tmp_path):
    from gptoss_webui.logs import tail

    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i}\n" for i in range(5000)))
    end = tail(log, max_bytes=100)
    assert end.startswith("line ") and end.endswith("line 4999\n")
    assert tail(log, lines=2) == "line 4998\nline 4999" and tail(tmp_path / "missing") == ""
    assert json.loads(json.dumps(runview.fmt_duration(3725))) == "1:02:05"


def test_the_metrics_line_shows_what_preparing_the_data_did_in_both_languages(tmp_path):
    from gptoss_webui.train.data import DataStats
    from gptoss_webui.ui.train_tab import metrics_md

    run = _fake_run(tmp_path, "r1", None, state="finished")
    stats = DataStats(rows=1000, truncated=84, dropped=2, examples=998, blocks=593, padding=0.031,
                      padding_unpacked=0.303)
    EventWriter(run.events_path).emit("start", world_size=1, model="m", trainable_params=1, total_params=2,
                                      total_steps=38, resumed_from_step=0, data=stats.__dict__)
    v = runview.view(run)
    # The pipeline's words (the CLI prints the same English), in the page's language.
    assert f"data: {stats.summary()}" in metrics_md(v, "en")
    assert ("998 training examples from 1,000 rows (84 truncated at max_length, 2 dropped: nothing left to train), "
            "packed into 593 blocks; padding 3.1% of tokens (one example per item: 30.3%)") in metrics_md(v, "en")
    assert ("数据：1,000 行得到 998 个训练样本（84 个被截断到 max_length，2 个因没有可训练内容而丢弃），打包为 593 块；"
            "填充占 token 的 3.1%（每项一个样本时：30.3%）") in metrics_md(v, "zh")
