"""bench/train.py on the CPU: the smoke grid runs every code path on tiny shapes; the table logic is right."""

from __future__ import annotations

import json

from bench.train import GRIDS, Case, add_ratios, error_pct, main, markdown, train_config


def test_error_pct_is_signed_against_the_measurement():
    assert error_pct(55.0, 50.0) == 10.0
    assert error_pct(45.0, 50.0) == -10.0
    assert error_pct(45.0, None) is None


def test_ratios_use_the_best_hf_row_at_the_same_seq():
    rows = [{"setup": "hf", "seq": 4096, "tokens_per_s": 2000.0}, {"setup": "hf", "seq": 4096, "tokens_per_s": 8000.0},
            {"setup": "ours", "seq": 4096, "tokens_per_s": 6000.0}, {"setup": "ours", "seq": 1024, "tokens_per_s": 1.0}]
    add_ratios(rows)
    assert [r["x_best_hf"] for r in rows] == [0.25, 1.0, 0.75, None]


def test_train_config_follows_the_preset_and_the_case():
    ours = train_config(Case("ours", 4096, True, "auto", "preset"), "gpt-oss-20b-1xh100", [])
    assert (ours.lora.r, ours.lora.expert_layers, ours.data.max_length) == (8, [7, 15, 23], 4096)
    assert not ours.deepspeed.enabled  # the bench runs no DeepSpeed, so the estimate must not count buckets
    base = train_config(Case("hf", 1024, False, "eager", "qkvo16"), "gpt-oss-20b-1xh100", [])
    assert (base.lora.r, base.lora.expert_parameters, base.gradient_checkpointing) == (16, [], False)


def test_every_grid_starts_with_the_core_rows():
    assert GRIDS["full"][: len(GRIDS["core"])] == GRIDS["core"]
    assert {c.setup for c in GRIDS["core"]} == {"ours", "hf"}


def test_smoke_grid_runs_and_the_estimator_counts_what_peft_builds(tmp_path):
    assert main(["--grid", "smoke", "--out", str(tmp_path), "--warmup", "0", "--steps", "1"]) == 0
    rows = json.loads((tmp_path / "bench_train.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "ok", "ok"]
    assert rows[2]["seq"] == 40 and "padded to 64" in rows[2]["name"]
    assert rows[3]["base"] == "mxfp4"  # the MXFP4-resident experts, built as the worker builds them
    assert rows[4]["offload"] and "offload" in rows[4]["name"]  # the same losses: test_train_variants_e2e
    for row in rows:
        assert row["trainable_params"] == row["est_trainable"]
        assert 11.0 < row["loss_first"] < 13.0  # random weights: about ln(201,088) = 12.2
    table = (tmp_path / "bench_train.md").read_text()
    assert table.count("\n| ours |") == 2 and "| ours mxfp4 |" in table and "| hf |" in table
    assert "| ours offload |" in table
    assert markdown(rows, json.loads((tmp_path / "bench_train.json").read_text())["meta"]) == table


def test_profile_step_reports_the_step_and_its_top_ops_on_the_cpu():
    import torch

    from bench.step_profile import profile_step

    w = torch.randn(256, 256, requires_grad=True)

    def step():
        (torch.randn(64, 256) @ w).square().sum().backward()

    got = profile_step(step, "cpu", top=5)
    names = [name for name, _, _ in got["top"]]
    assert got["wall_ms"] > 0 and got["kernel_ms"] > 0 and len(names) == 5
    assert any("mm" in name for name in names), names
