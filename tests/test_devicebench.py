"""``edgeserve bench`` through the click group, on the real default model at a tiny configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgeserve.cli import main
from edgeserve.devicebench import SCHEMA
from edgeserve.devicebench.roofline import Bandwidth, roofline_tok_s

TINY = ["--backends", "llama", "--contexts", "64", "--decode-tokens", "8", "--reps", "1", "--threads", "1"]


def _positive(row: dict[str, Any], keys: list[str]) -> None:
    for key in keys:
        assert isinstance(row[key], (int, float)) and row[key] > 0, (key, row[key])


@pytest.mark.slow
def test_bench_writes_the_report_the_planner_reads(tmp_path: Path, default_model_path: Path) -> None:
    out = tmp_path / "device.json"
    result = CliRunner().invoke(main, ["bench", *TINY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["schema"] == SCHEMA
    assert report["command"].startswith("edgeserve bench") and "--contexts 64" in report["command"]
    assert report["settings"] == {
        "model": "default", "contexts": [64], "decode_tokens": 8, "reps": 1, "threads": 1, "threads_pinned": True,
    }  # fmt: skip
    assert report["device"]["physical_cores"] >= 1 and report["device"]["memory_bytes"] > 0
    assert float(report["memory_bandwidth"]["read_gbs"]["1"]) > 0
    assert set(report["backends"]) == {"llama"}

    llama = report["backends"]["llama"]
    assert llama["status"] == "ok" and llama["device"] == "cpu"
    _positive(llama, ["load_s", "peak_rss_bytes", "bandwidth_gbs", "kv_bytes_per_token"])
    assert llama["peak_rss_added_bytes"] == llama["peak_rss_bytes"] - llama["rss_before_load_bytes"] > 0
    weights = llama["weights"]
    # Gemma 3 ties its output layer to the embedding: every step reads all tensor data.
    assert 0 < weights["output_layer_bytes"] < weights["bytes_read_per_token"] <= weights["file_bytes"]

    (row,) = llama["contexts"]
    assert row["context"] == 64 and row["reps"] == 1
    _positive(row, ["prefill_tok_s", "ttft_ms", "decode_tok_s", "park_ms", "restore_ms", "roofline_tok_s"])
    _positive(row, ["roofline_pct", "park_bytes", "kv_bytes", "kv_bytes_per_token"])
    # The parked state covers the prompt and the decoded tokens but the last one picked.
    assert row["state_tokens"] == 64 + 8
    assert row["bytes_read_per_token"] == weights["bytes_read_per_token"] + row["kv_bytes"]
    assert row["roofline_tok_s"] == pytest.approx(llama["bandwidth_gbs"] * 1e9 / row["bytes_read_per_token"])
    _positive(llama["default_sampling"], ["decode_tok_s", "greedy_decode_tok_s"])
    assert llama["kv_bytes_per_token"] == row["kv_bytes_per_token"]  # one context: its average

    (step,) = llama["breakdown"]["by_threads"].values()
    _positive(step, ["step_ms", "rest_ms", "sample_greedy_ms", "ceiling_gbs"])
    assert step["lm_head_ms"] >= 0 and step["lm_head_ms"] + step["rest_ms"] == pytest.approx(step["step_ms"])

    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "decode tok/s" in result.stdout and "% roofline" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--contexts", "128,abc"], "--contexts"),
        (["--contexts", "4"], "8 tokens or more"),
        (["--backends", "llama,tpu"], "unknown backend 'tpu'"),
        (["--reps", "0"], "--reps"),
    ],
)
def test_bad_flags_are_usage_errors_before_anything_loads(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_roofline_uses_the_best_bandwidth_the_thread_count_can_reach() -> None:
    bw = Bandwidth(read_gbs={1: 10.0, 2: 14.0, 4: 13.0}, copy_gbs={}, buffer_bytes=1, repeats=1)
    assert bw.ceiling(1) == 10.0 and bw.ceiling(2) == 14.0 and bw.ceiling(8) == 14.0
    assert roofline_tok_s(10.0, 250_000_000) == pytest.approx(40.0)
    assert roofline_tok_s(None, 250_000_000) is None


def _safetensors(path: Path, tensors: dict[str, tuple[int, int]]) -> None:
    """A float32 safetensors file of zeros: name -> (rows, columns)."""
    header, offset = {}, 0
    for name, (rows, cols) in tensors.items():
        header[name] = {"dtype": "F32", "shape": [rows, cols], "data_offsets": [offset, offset + 4 * rows * cols]}
        offset += 4 * rows * cols
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + bytes(offset))


def test_an_untied_embedding_is_read_one_row_a_step(tmp_path: Path) -> None:
    from edgeserve.devicebench.roofline import folder_weights

    tied, untied = tmp_path / "tied", tmp_path / "untied"
    tied.mkdir(), untied.mkdir()
    _safetensors(tied / "model.safetensors", {"model.embed_tokens.weight": (100, 8), "layers.0.w": (8, 8)})
    _safetensors(untied / "model.safetensors", {"model.embed_tokens.weight": (100, 8), "lm_head.weight": (100, 8)})
    assert folder_weights(tied).read_per_token == 4 * (800 + 64)  # the output layer reads all of it
    assert folder_weights(tied).output_bytes == 4 * 800
    assert folder_weights(untied).read_per_token == 4 * (8 + 800)  # one embedding row + the lm_head
