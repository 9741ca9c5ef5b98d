"""The command line through click's CliRunner, on the real default model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeserve import Engine
from edgeserve.cli import main
from edgeserve.settings import ModelSettings

FAST = ["--n-ctx", "1024", "--backend", "llama"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def test_run_prints_a_real_continuation(runner: CliRunner, default_model_path: object) -> None:
    result = runner.invoke(main, ["run", "The capital of France is", "--max-tokens", "16", "--temperature", "0", *FAST])
    assert result.exit_code == 0, result.output
    # The engine's own greedy continuation at the same settings. Not a fixed string: where a near tie
    # falls at the defaults (flash attention on) depends on the CPU's kernels, and two machines here
    # went two ways after "the capital of the".
    with Engine.from_settings(ModelSettings(model="default", backend="llama", n_ctx=1024)) as engine:
        expected = engine.generate("The capital of France is", max_tokens=16, temperature=0)
    assert expected.text.startswith(" the capital of")
    assert result.stdout == expected.text + "\n"
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


# ---- generated flags, sources of bad values, help ------------------------------------------------


def test_every_sampling_field_has_a_flag_that_builds_it(runner: CliRunner) -> None:
    import dataclasses

    import click

    from edgeserve.cli import _sampling, sampling_options
    from edgeserve.types import SamplingParams

    for command in ("run", "chat"):
        names = {p.name for p in main.commands[command].params}
        assert {f.name for f in dataclasses.fields(SamplingParams)} <= names, command

    built: list[SamplingParams] = []

    @click.command()
    @sampling_options
    def probe(**values: object) -> None:
        built.append(_sampling(dict(values)))

    args = ["--max-tokens", "none", "--temperature", "0.5", "--top-p", "0.9", "--top-k", "7", "--min-p", "0.1"]
    args += ["--seed", "3", "--stop", "\n", "--stop", "END", "--repetition-penalty", "1.1"]
    args += ["--presence-penalty", "0.5", "--frequency-penalty", "-0.5", "--ignore-eos", "--logit-bias", '{"123": 5}']
    result = runner.invoke(probe, args)
    assert result.exit_code == 0, result.output
    assert built[-1] == SamplingParams(
        max_tokens=None,
        temperature=0.5,
        top_p=0.9,
        top_k=7,
        min_p=0.1,
        seed=3,
        stop=("\n", "END"),
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        ignore_eos=True,
        logit_bias={123: 5.0},
    )
    assert runner.invoke(probe, []).exit_code == 0 and built[-1] == SamplingParams()  # the same defaults
    bad = runner.invoke(probe, ["--logit-bias", "[1, 2]"])
    assert bad.exit_code == 2 and "JSON object of token id to number" in bad.output
    bad = runner.invoke(probe, ["--min-p", "2"])
    assert bad.exit_code == 2 and "--min-p: min_p must be in [0, 1]" in bad.output


def test_a_bad_environment_variable_is_named_as_the_source(runner: CliRunner) -> None:
    result = runner.invoke(main, ["run", "x"], env={"EDGESERVE_THREADS": "abc"})
    assert result.exit_code == 2
    assert "environment variable EDGESERVE_THREADS='abc'" in result.output and "--threads" not in result.output
    result = runner.invoke(main, ["run", "x", "--threads", "0"], env={"EDGESERVE_THREADS": "abc"})
    assert result.exit_code == 2 and "--threads: Input should be greater than or equal to 1" in result.output
    result = runner.invoke(main, ["proxy"], env={"EDGESERVE_PROXY_UPSTREAM": "ftp://x"})
    assert result.exit_code == 2 and "environment variable EDGESERVE_PROXY_UPSTREAM='ftp://x'" in result.output


def test_run_and_chat_help_list_no_server_options_and_serve_shows_its_defaults(runner: CliRunner) -> None:
    server_only = ("--max-queue", "--policy", "--aging-s", "--aging-factor", "--adapt-log", "--predictor")
    for command in ("run", "chat"):
        text = runner.invoke(main, [command, "--help"]).output
        assert "--temperature" in text and "--threads" in text
        assert not [o for o in server_only if o in text], command
    text = " ".join(runner.invoke(main, ["serve", "--help"]).output.split())  # unwrapped
    assert "--host TEXT Address to bind; loopback unless you mean it. [default: 127.0.0.1]" in text
    assert "--port INTEGER Port to listen on. [default: 8080]" in text
    assert all(o in text for o in server_only)


# ---- serve and proxy startup: the port, logging ----------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Stop(Exception):
    """Raised by the stand-in for the model load: the command got as far as loading."""


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Engine.from_settings replaced by a probe that records the root log level and stops there."""
    import logging

    from edgeserve.engine import Engine

    seen: list[int] = []

    def load(*args: object, **kwargs: object) -> None:
        seen.append(logging.getLogger().level)
        raise _Stop

    monkeypatch.setattr(Engine, "from_settings", load)
    return seen


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.mark.parametrize("command", ["serve", "proxy"])
def test_a_taken_port_fails_at_once_before_the_model_loads(
    runner: CliRunner, no_model: list[int], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    import socket

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("uvicorn started on a taken port"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(main, [command, "--port", str(port)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: port {port} on 127.0.0.1 is already in use; stop what listens there " + (
        "or choose another with --port"
    )
    assert no_model == []  # the model was never loaded


@pytest.mark.parametrize(
    ("args", "level"),
    [
        (["serve", "--log-level", "debug"], "DEBUG"),
        (["serve", "--log-level", "warning"], "WARNING"),
        (["-v", "serve", "--log-level", "warning"], "INFO"),  # the more verbose of the two
        (["serve"], "INFO"),
    ],
)
def test_serve_log_level_reaches_the_root_logger_through_the_group(
    runner: CliRunner, no_model: list[int], args: list[str], level: str
) -> None:
    import logging

    result = runner.invoke(main, [*args, "--port", str(_free_port())])
    assert isinstance(result.exception, _Stop), result.output
    assert no_model == [logging.getLevelName(level)]


def test_proxy_log_level_reaches_the_root_logger_through_the_group(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    import uvicorn

    seen: list[tuple[int, object]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.append((logging.getLogger().level, kw["log_level"])))
    result = runner.invoke(main, ["proxy", "--log-level", "debug", "--port", str(_free_port())])
    assert result.exit_code == 0, result.output
    assert seen == [(logging.DEBUG, "debug")]


def test_serve_log_prompts_logs_the_prompt(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, default_model_path: object
) -> None:
    """End to end through the group: the real model, the real app, a real request (through
    Starlette's in-process client instead of a socket); the prompt shows up in the log."""
    import uvicorn
    from starlette.testclient import TestClient

    def serve_one(app: object, **kwargs: object) -> None:
        with TestClient(app, base_url="http://127.0.0.1") as client:  # type: ignore[arg-type]
            reply = client.post(
                "/v1/completions", json={"model": "default", "prompt": "purple elephants", "max_tokens": 2}
            )
            assert reply.status_code == 200, reply.text

    monkeypatch.setattr(uvicorn, "run", serve_one)
    args = ["serve", "--log-prompts", "--port", str(_free_port()), "--threads", "1", *FAST]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "prompt='purple elephants'" in result.stderr
    quiet = runner.invoke(main, ["serve", "--port", str(_free_port()), "--threads", "1", *FAST])
    assert quiet.exit_code == 0, quiet.output
    assert "purple elephants" not in quiet.stderr
