"""The command line through click's CliRunner, on the real default model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeserve.cli import main

FAST = ["--n-ctx", "1024", "--backend", "llama"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def test_run_prints_a_real_continuation(runner: CliRunner, default_model_path: object) -> None:
    result = runner.invoke(main, ["run", "The capital of France is", "--max-tokens", "16", "--temperature", "0", *FAST])
    assert result.exit_code == 0, result.output
    # The base model's greedy continuation (the same as raw llama-cpp-python's, see test_engine).
    assert result.stdout.startswith(" the capital of the country of France")
    assert "TTFT" in result.stderr and "tok/s" in result.stderr


def test_run_json_reports_the_result(runner: CliRunner, default_model_path: object) -> None:
    result = runner.invoke(main, ["run", "Hello", "--max-tokens", "3", "--ignore-eos", "--json", *FAST])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["completion_tokens"] == 3 and data["finish_reason"] == "length"


def test_chat_reads_stdin_when_not_a_terminal(runner: CliRunner, default_model_path: object) -> None:
    stdin = "What is the capital of France?\n/reset\nAnd of Italy?\n/exit\nnever read\n"
    result = runner.invoke(main, ["chat", "--max-tokens", "8", "--temperature", "0", *FAST], input=stdin)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("template: builtin:gemma") == 2
    assert "[conversation cleared]" in result.stderr


def test_models_lists_the_default(runner: CliRunner) -> None:
    result = runner.invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert any(r["name"] == "default" and r["source"] == "default" for r in rows)


def test_info_reports_hardware_and_backends(runner: CliRunner) -> None:
    result = runner.invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["hardware"]["physical_cores"] >= 1
    assert data["backends"]["llama"]["installed"] is True
    assert data["chosen_backend"] == "llama"
    plain = runner.invoke(main, ["info"])
    assert "chosen:   llama" in plain.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "x", "--model", "no-such-model:1b"], "not found; looked for"),
        (["run", "x", "--backend", "tensorflow"], "'tensorflow' is not one of"),
        (["run", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["run", "x", "--max-tokens", "0"], "max_tokens must be >= 1"),
        (["run", "x", "--n-ctx", "10"], "--n-ctx"),
    ],
)
def test_user_errors_are_one_clear_line_without_traceback(runner: CliRunner, args: list[str], needle: str) -> None:
    result = runner.invoke(main, args)
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_backend_whose_extra_is_missing_names_the_extra(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeserve import backend

    monkeypatch.setattr(backend.BackendSpec, "installed", lambda self: self.name == "llama")
    result = runner.invoke(main, ["run", "x", "--backend", "mlx", "--n-ctx", "1024"])
    assert result.exit_code == 2
    assert "pip install 'edgeserve[mlx]'" in result.output


def test_chat_survives_a_message_longer_than_the_context(runner: CliRunner, default_model_path: object) -> None:
    stdin = "word " * 300 + "\nWhat is 2+2?\n"
    args = ["chat", "--max-tokens", "4", "--n-ctx", "128", "--backend", "llama"]
    result = runner.invoke(main, args, input=stdin)
    assert result.exit_code == 0, result.output
    assert "context" in result.stderr and "/reset starts over" in result.stderr
    assert result.stderr.count("template: builtin:gemma") == 1  # the next message was answered
