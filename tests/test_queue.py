"""The GPU ledger and the queue (train/queue.py): a second training on held GPUs waits its turn, runs after the
first, and can be taken out of the queue; `--no-queue` refuses with the reason. Real launches of the demo preset
(2 CPU ranks, which stand for GPU ids 0 and 1); the ledger itself is also checked with fake GPU ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from gptoss_webui.events import read_all
from gptoss_webui.presets import load_recipe
from gptoss_webui.runs import RunsDir
from gptoss_webui.train import queue
from gptoss_webui.train.launcher import LaunchError, launch, run_state, stop
from gptoss_webui.train.supervise import remove_allreduce_buffers

SHORT = ["train.optim.max_steps=2", "train.save_steps=100"]


def _recipe(runs, name: str):
    return load_recipe("tiny-cpu-demo", [f"train.runs_dir={runs}", f"train.run_name={name}", *SHORT])


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _events(run, kind: str) -> list[dict]:
    return [e for e in read_all(run.events_path) if e["type"] == kind]


def test_the_ledger_names_who_holds_which_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_WORKSPACE", str(tmp_path / "ws"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        created = psutil.Process(sleeper.pid).create_time()
        run = RunsDir(tmp_path / "runs").create("holder")
        run.config_path.write_text("train: {}\n")
        run.write_status(state="running", pid=sleeper.pid, pgid=sleeper.pid, create_time=created, gpus=[3, 5])
        (tmp_path / "ws").mkdir()
        (tmp_path / "ws" / "engine.json").write_text(json.dumps(
            {"state": "running", "pid": sleeper.pid, "create_time": created, "port": 1, "gpus": [6]}))
        held = queue.holders(tmp_path / "runs", [5, 6, 7])
        assert [str(h) for h in held] == ["run holder (GPUs 5)", "the serving engine (GPUs 6)"]
        assert [h.render("zh") for h in held] == ["运行 holder（GPU 5）", "部署引擎（GPU 6）"]  # as the UI shows them
        assert queue.holders(tmp_path / "runs", [4, 7]) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    assert queue.holders(tmp_path / "runs", [5]) == []  # its process is gone: the run no longer holds anything


def test_a_second_training_waits_its_turn_and_a_queued_one_can_be_cancelled(tmp_path):
    runs = tmp_path / "runs"
    first = launch(_recipe(runs, "first"))
    second = launch(_recipe(runs, "second"))
    third = launch(_recipe(runs, "third"))
    assert run_state(first) == "running"
    assert run_state(second) == run_state(third) == "queued"
    assert str(queue.place(second)) == "queued for GPUs 0,1, behind run first (GPUs 0,1)"
    assert "behind run first (GPUs 0,1), run second (queued before it)" in str(queue.place(third))
    with pytest.raises(LaunchError, match=r"GPUs 0,1 are taken by run first \(GPUs 0,1\), run second \(queued "
                                          r"before it\), run third \(queued before it\): two jobs on one GPU"):
        launch(_recipe(runs, "refused"), wait_in_queue=False)
    assert not (runs / "refused").exists()

    assert stop(second) == "run second was queued; taken out of the queue"
    assert run_state(second) == "stopped" and _events(second, "stopped") and not _events(second, "start")
    _wait(lambda: run_state(third) in ("finished", "failed"), 600, "the third run to train after the first")
    assert run_state(first) == "finished" and run_state(third) == "finished"
    # One after the other: the third started training after the first had written its adapter.
    assert _events(third, "start")[0]["time"] > _events(first, "done")[0]["time"]
    assert not _events(second, "start")
    assert "queued: waiting for run first" in third.log_path.read_text()


def test_a_finished_run_leaves_no_allreduce_buffer_of_its_own(tmp_path):
    """The supervisor deletes DeepSpeed's /dev/shm files of its run's master port, and nobody else's."""
    uid = os.getuid()
    names = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29511_{rank}" for rank in (0, 1)]
    others = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29512_0",
              f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_29511_0"]
    for name in names + others:
        (tmp_path / name).write_bytes(b"x")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", "29511", "--module", "gptoss_webui.train.worker"]
    assert [p.name for p in remove_allreduce_buffers(cmd, tmp_path)] == names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
