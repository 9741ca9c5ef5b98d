"""ONNX Runtime specifics: the model builder's adjustments, the converter's cache, cross-backend
agreement with llama.cpp under teacher forcing, and the token-only
KV state moving between engines."""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgeserve import Engine
from edgeserve.backend import Step
from edgeserve.errors import InvalidParameterError
from edgeserve.progress import ProgressEvent
from edgeserve.settings import ModelSettings

og = pytest.importorskip("onnxruntime_genai", reason="the onnx extra is not installed: pip install 'edgeserve[onnx]'")

from agreement import AGREEMENT_MIN, AGREEMENT_TEXT, llama_cpp_argmax  # noqa: E402

from edgeserve.backends import onnx as onnx_backend  # noqa: E402
from edgeserve.models import convert as conv  # noqa: E402
from edgeserve.models.convert import onnx as onnx_format  # noqa: E402

SETTINGS = ModelSettings(model="default", backend="onnx", n_ctx=1024, threads=1)


# ---- the converter --------------------------------------------------------------------------


def test_transformers_5_rope_settings_are_flattened_for_the_builder() -> None:
    config = types.SimpleNamespace(
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        }
    )
    onnx_format._flatten_rope(config)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1_000_000.0}
    assert (config.rope_theta, config.rope_local_base_freq) == (1_000_000.0, 10_000.0)
    flat = types.SimpleNamespace(rope_parameters={"rope_type": "linear", "factor": 8.0})
    onnx_format._flatten_rope(flat)
    assert flat.rope_parameters == {"rope_type": "linear", "factor": 8.0}


def test_builder_output_becomes_progress_stages() -> None:
    seen: list[tuple[str, int, int]] = []
    lines = [
        "Reading embedding layer\n",
        "Reading layer 0\n",
        "Reading layer 1\n",
        "2026 [INFO] - complete quantization of /lm_head/MatMul with 8 bits ...\n",
        "Saving x: 1%\rSaving y: 2%\n",
        "Saving GenAI config in /tmp/x\n",
    ]
    tail: list[str] = []
    onnx_format._follow(lines, lambda *a: seen.append(a), tail, 2)
    assert seen == [
        ("making the graph", 1, 2),
        ("making the graph", 2, 2),
        ("quantizing weights", 1, 0),
        ("writing the model", 0, 0),
    ]
    assert tail[-1] == "Saving GenAI config in /tmp/x" and "Saving y: 2%" in tail


@pytest.mark.parametrize("options", [{"precision": "int3"}, {"target": "tpu"}, {"dtype": "float32"}])
def test_bad_options_fail_before_any_work(gguf_path: Path, tmp_path: Path, options: dict[str, str]) -> None:
    with pytest.raises(InvalidParameterError):
        conv.convert(gguf_path, "onnx", cache_dir=tmp_path, options=options)
    assert not (tmp_path / "converted").exists()


def test_a_conversion_is_built_once_then_served_from_the_cache(gguf_path: Path, onnx_folder: Path) -> None:
    def must_not_build(event: ProgressEvent) -> None:
        raise AssertionError(f"converted again: {event.task}")

    again = conv.convert(gguf_path, "onnx", cache_dir=SETTINGS.cache_dir, progress=must_not_build)
    assert again == onnx_folder
    assert again.name == f"onnx-{onnx_format.DEFAULT_PRECISION}-{onnx_format.default_target()}"
    for name in ("genai_config.json", "model.onnx", "tokenizer.json", conv.STAMP):
        assert (again / name).is_file(), name
    # The HF folder's tokenizer files replace the builder's re-saved ones (which lose add_bos_token).
    hf = conv.convert(gguf_path, "hf", cache_dir=SETTINGS.cache_dir)
    assert (again / "tokenizer_config.json").read_text() == (hf / "tokenizer_config.json").read_text()
    assert not (again / ".builder-cache").exists()


def test_the_cli_prints_the_cached_folder(onnx_folder: Path) -> None:
    from edgeserve.models.convert.cli import convert

    result = CliRunner().invoke(convert, ["default", "--to", "onnx"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(onnx_folder)
    bad = CliRunner().invoke(convert, ["default", "--to", "onnx", "--precision", "int2"])
    assert bad.exit_code == 2


# ---- the default model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    from edgeserve.models import resolve

    return resolve("default", cache_dir=SETTINGS.cache_dir).path


@pytest.fixture(scope="module")
def onnx_folder(gguf_path: Path) -> Path:
    return conv.convert(gguf_path, "onnx", cache_dir=SETTINGS.cache_dir)


@pytest.fixture(scope="module")
def engine(onnx_folder: Path) -> Iterator[Engine]:
    with Engine.from_settings(SETTINGS) as eng:
        yield eng


class _Argmax:
    """A sampler that picks the likeliest token and remembers it (teacher forcing ignores it)."""

    def __init__(self, out: list[int]) -> None:
        self.out = out

    def __call__(self, logits: np.ndarray[Any, Any]) -> int:
        self.out.append(int(np.argmax(logits)))
        return self.out[-1]

    def close(self) -> None:
        pass


def test_the_execution_provider_is_reported(engine: Engine) -> None:
    providers = onnx_backend.execution_providers()
    assert providers[-1] == "cpu"
    assert engine.capabilities.device in providers


def test_teacher_forced_next_token_agreement_with_llama_cpp(
    engine: Engine, gguf_path: Path, record_property: Any
) -> None:
    """Both backends read the same text; at each position, do they predict the same next token?
    llama.cpp runs the GGUF's Q4_K/Q5_0/Q6_K/Q8_0 weights; ONNX Runtime the builder's re-quantized
    (or float32) copy of their dequantized values. The graph returns the last position's logits
    only (pruned output layer), so the text is fed one token at a time."""
    tokens = engine.tokenize(AGREEMENT_TEXT)
    theirs = llama_cpp_argmax(gguf_path, tokens)

    def ours(backend: Any) -> np.ndarray[Any, Any]:
        out: list[int] = []
        seq = backend.capabilities().max_sequences + 100
        backend.open(seq, tokens, reuse=False)
        for t in tokens:  # each step's argmax, whatever was fed
            backend.decode([Step(seq, t, _Argmax(out))])
        backend.release(seq)
        return np.array(out)

    agreement = float((engine.call(ours) == theirs).mean())
    record_property("onnx_llama_argmax_agreement", agreement)
    print(f"\nONNX Runtime vs llama.cpp next-token argmax agreement: {agreement:.4f} over {len(tokens)} positions")
    assert agreement >= AGREEMENT_MIN


def test_a_state_moves_to_another_engine_as_tokens(engine: Engine) -> None:
    prompt = "The three primary colours are"
    tokens = engine.tokenize(prompt)
    blob = engine.export_state(prompt)
    assert len(blob) < 1000  # the tokens and their batches, not the keys and values
    expected = engine.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True, seed=1).text
    with Engine.from_settings(SETTINGS) as other:
        again = other.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True, kv_state=blob)
    assert again.cached_prompt_tokens == len(tokens) - 1
    assert again.text == expected


def test_a_long_prompt_past_the_sliding_window_is_reused_exactly(engine: Engine) -> None:
    # Past 512 tokens (+16 slack as built) the sliding-window layers' ring would have dropped the
    # positions a rewind needs; the backend sizes the ring to the context so that it never does.
    long_prompt = AGREEMENT_TEXT + " " + AGREEMENT_TEXT + " " + AGREEMENT_TEXT
    fresh = engine.generate(long_prompt, max_tokens=6, temperature=0, ignore_eos=True, seed=2)
    assert fresh.prompt_tokens > 600
    reused = engine.generate(long_prompt, max_tokens=6, temperature=0, ignore_eos=True)
    assert reused.cached_prompt_tokens == fresh.prompt_tokens - 1
    assert reused.text == fresh.text
