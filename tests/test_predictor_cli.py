"""``edgeserve predict`` and ``edgeserve predictor info`` through click's runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeserve.predictor.cli import predict_command, predictor


def run_predict(lines: list[str]) -> list[dict[str, object]]:
    result = CliRunner().invoke(predict_command, ["--input", "-"], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def test_round_trip_keeps_order_and_shapes() -> None:
    lines = [
        json.dumps({"prompt": "What is the capital of France? One word."}),
        json.dumps({"messages": [{"role": "user", "content": "Write a 2000-word story about a dragon."}]}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe this"}]}]}),
    ]
    out = run_predict(lines)
    assert len(out) == 3
    for item in out:
        assert set(item) == {"expected_tokens", "class"}
        assert isinstance(item["expected_tokens"], float)
        assert item["class"] in ("short", "medium", "long")
    assert out[0]["expected_tokens"] < out[1]["expected_tokens"]  # type: ignore[operator]


def test_bad_lines_get_errors_and_the_batch_goes_on() -> None:
    lines = [
        "{not json",
        json.dumps({"prompt": ""}),
        json.dumps({"prompt": "hello there"}),
        "",
        json.dumps({"messages": []}),
        json.dumps(["a list"]),
        json.dumps({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
        json.dumps({"messages": [{"role": "user", "content": "Explain TCP."}]}),
    ]
    out = run_predict(lines)
    assert len(out) == len(lines) - 1  # the blank line is skipped, not an error
    errors = [i for i, item in enumerate(out) if "error" in item]
    assert errors == [0, 1, 3, 4, 5]
    assert out[0]["line"] == 1 and "not JSON" in str(out[0]["error"])
    assert "empty" in str(out[1]["error"])
    assert "class" in out[2] and "class" in out[6]
    assert [item["line"] for item in out if "error" in item] == [1, 2, 5, 6, 7]  # input line numbers


def test_blank_lines_are_skipped() -> None:
    out = run_predict(["", json.dumps({"prompt": "hi"}), "   ", "", json.dumps({"prompt": "hello"}), ""])
    assert len(out) == 2 and all("class" in item for item in out)


def test_train_on_a_small_sample_says_why_short_vs_long_is_missing(tmp_path: Path) -> None:
    """--limit 300 holds no answer of 800+ tokens in its test split: the figure is n/a, with the
    reason, not 'nan' (the real training run, on the first 300 ShareGPT pairs)."""
    pytest.importorskip("xgboost")
    result = CliRunner().invoke(predictor, ["train", "--limit", "300", "--out", str(tmp_path / "lp")])
    assert result.exit_code == 0, result.output
    assert "short-vs-long n/a (no long (>= 800 tokens) answers in the test split)" in result.output
    assert "nan" not in result.output
    meta = json.loads((tmp_path / "lp.json").read_text())
    assert meta["metrics"]["test"]["long_answers"] == 0 and meta["metrics"]["test"]["short_answers"] > 0


def test_short_vs_long_reads_as_a_number_or_a_reason() -> None:
    from edgeserve.predictor.cli import short_vs_long

    assert short_vs_long({"short_long_accuracy": 0.75, "short_answers": 3, "long_answers": 1}) == "0.750"
    nan = float("nan")
    assert short_vs_long({"short_long_accuracy": nan, "short_answers": 0, "long_answers": 0}) == (
        "n/a (no short (< 200 tokens) and no long (>= 800 tokens) answers in the test split)"
    )


def test_input_file(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    result = CliRunner().invoke(predict_command, ["--input", str(path)])
    assert result.exit_code == 0
    assert "class" in json.loads(result.output)


def test_info_shows_the_training_summary() -> None:
    result = CliRunner().invoke(predictor, ["info"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["training_data"]["pairs"] > 50_000
    assert info["features"]["vocabulary_terms"] > 0


def test_cli_import_stays_cheap() -> None:
    import subprocess
    import sys

    code = (
        "import sys, edgeserve.predictor.cli;"
        "print(sorted(m for m in ('onnxruntime', 'xgboost', 'rich.progress', 'edgeserve.predictor.model')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_names_resolve() -> None:
    import edgeserve.predictor as package

    for name in package.__all__:
        assert getattr(package, name) is not None
