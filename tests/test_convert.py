"""The GGUF → Hugging Face / MLX converter, on the embedded default model (Gemma 3 270M Q4_K_M)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgeserve.errors import InvalidParameterError, UserError
from edgeserve.models import convert as conv
from edgeserve.settings import ModelSettings

pytest.importorskip("tokenizers", reason="the converter needs the mlx extra: pip install 'edgeserve[mlx]'")

SETTINGS = ModelSettings(model="default", backend="llama")


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    from edgeserve.models import resolve

    return resolve("default", cache_dir=SETTINGS.cache_dir).path


@pytest.fixture(scope="module")
def hf_folder(gguf_path: Path) -> Path:
    return conv.convert(gguf_path, "hf", cache_dir=SETTINGS.cache_dir)


@pytest.fixture(scope="module")
def reader(gguf_path: Path) -> Any:
    import gguf

    return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="module")
def llama_vocab(gguf_path: Path) -> Any:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def test_config_describes_the_model(hf_folder: Path) -> None:
    config = json.loads((hf_folder / "config.json").read_text())
    expected = {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "num_hidden_layers": 18,
        "hidden_size": 640,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "vocab_size": 262144,
        "max_position_embeddings": 32768,
        "sliding_window": 512,
        # Not in the GGUF metadata; Gemma 3 facts the converter supplies.
        "sliding_window_pattern": 6,
        "rope_local_base_freq": 10000.0,
        "rope_theta": 1000000.0,
        "query_pre_attn_scalar": 256,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": [1, 106, 212],
    }
    assert {k: config[k] for k in expected} == expected
    assert config["layer_types"].count("full_attention") == 3
    generation = json.loads((hf_folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 106, 212]


def test_weights_are_the_gguf_dequantized(hf_folder: Path, reader: Any) -> None:
    import gguf
    from safetensors import safe_open

    by_name = {t.name: t for t in reader.tensors}
    with safe_open(str(hf_folder / "model.safetensors"), framework="numpy") as f:
        assert len(list(f.keys())) == len(by_name) == 236
        for gguf_name, hf_name, minus in [
            ("token_embd.weight", "model.embed_tokens.weight", 0),  # Q8_0
            ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 0),  # Q5_0
            ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight", 0),  # Q4_K
            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", 0),  # Q6_K
            ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight", 1),  # F32, Gemma's 1 + w
            ("blk.5.attn_k_norm.weight", "model.layers.5.self_attn.k_norm.weight", 1),
        ]:
            t = by_name[gguf_name]
            expected = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) - np.float32(minus)
            got = f.get_tensor(hf_name)
            assert got.dtype == np.float32 and got.shape == expected.shape, hf_name
            assert np.array_equal(got, expected), hf_name


def _texts() -> list[str]:
    texts = [
        "Hello, world!",
        "  two spaces, three   and a tab\there\n\n\nnewlines",
        "naïve café 日本語のテキスト 한국어 العربية 😀🚀 \u200bzero\ufeffwidth",
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
        "<b>bold</b> <table><tr><td>x</td></tr></table> </s> <unused3>",
        "x = [i**2 for i in range(10)]  # squares\n\tif x:\n\t\treturn None",
        " " * 40 + "\n" * 35 + "\t" * 33 + "a" * 300,
    ]
    for path in sorted(Path(__file__).parent.glob("*.py"))[:8]:
        texts.append(path.read_text(encoding="utf-8")[:6000])
    rng = random.Random(0)
    alphabet = [chr(c) for c in [*range(32, 127), *range(0xA0, 0x250), *range(0x3040, 0x30FF), 0x1F600, 0xFFFD]]
    alphabet += ["\n", "\t", "  ", "<b>", "<start_of_turn>", "▁"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(1500)]
    return texts


def test_tokenizer_json_tokenizes_exactly_as_llama_cpp(hf_folder: Path, llama_vocab: Any) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    mismatched = [
        t
        for t in _texts()
        if tok.encode(t, add_special_tokens=False).ids != llama_vocab.tokenize(t.encode(), add_bos=False, special=True)
    ]
    assert not mismatched, f"{len(mismatched)} texts tokenize differently, e.g. {mismatched[0]!r}"
    assert tok.encode("Hi").ids[0] == 2  # the post-processor adds BOS, as the GGUF says


def test_transformers_reads_the_folder(hf_folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    assert tok("Hello  world\n\n").input_ids == [2, 9259, 138, 12392, 108]
    assert (tok.bos_token, tok.eos_token) == ("<bos>", "<eos>")
    assert transformers.AutoConfig.from_pretrained(str(hf_folder)).model_type == "gemma3_text"


def test_conversion_is_cached(hf_folder: Path, gguf_path: Path) -> None:
    weights = hf_folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert conv.convert(gguf_path, "hf", cache_dir=SETTINGS.cache_dir) == hf_folder
    assert conv.convert(gguf_path, "mlx", cache_dir=SETTINGS.cache_dir) == hf_folder  # float32 MLX = HF
    assert weights.stat().st_mtime_ns == before
    assert json.loads((hf_folder / conv.STAMP).read_text())["format"] == "hf"


def test_an_interrupted_conversion_leaves_nothing_that_looks_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF" + bytes(64))
    calls = []

    def build(src: Path, out: Path, options: Any, report: Any) -> None:
        (out / "half-written").write_text("x")
        calls.append(out)
        if len(calls) == 1:
            raise OSError("disk full")

    module = types.SimpleNamespace(folder_name=lambda options: "fake", build=build)
    monkeypatch.setitem(sys.modules, "fake_format", module)
    monkeypatch.setitem(conv.FORMATS, "fake", conv.Format("fake", "fake_format", "json", "x", None, "test"))
    with pytest.raises(OSError):
        conv.convert(source, "fake", cache_dir=tmp_path)
    root = next((tmp_path / "converted").glob("*-v*"))
    assert list(root.iterdir()) == []  # neither the folder nor its temporary sibling
    out = conv.convert(source, "fake", cache_dir=tmp_path)
    assert (out / conv.STAMP).is_file() and out.name == "fake"
    assert conv.convert(source, "fake", cache_dir=tmp_path) == out and len(calls) == 2


def test_bad_formats_and_options_fail_before_any_work(gguf_path: Path, tmp_path: Path) -> None:
    for to, options in [("onnx2", {}), ("hf", {"quantize": 4}), ("mlx", {"quantize": 3}), ("mlx", {"bogus": 1})]:
        with pytest.raises(InvalidParameterError):
            conv.convert(gguf_path, to, cache_dir=tmp_path, options=options)
    assert not (tmp_path / "converted").exists()
    from edgeserve.models.convert import archs, mlx

    # float32 MLX is the HF folder itself; other dtypes and quantizations get folders of their own.
    assert mlx.folder_name({}) is None and mlx.folder_name({"dtype": "bfloat16"}) == "mlx-bfloat16"
    assert mlx.folder_name({"quantize": 4, "group_size": 32}) == "mlx-float32-q4g32"
    with pytest.raises(InvalidParameterError):
        mlx.folder_name({"group_size": 32})  # a group size without quantization means nothing

    with pytest.raises(UserError, match="not supported"):
        archs.get("llama")


def test_cli_prints_the_cached_folder_and_refuses_bad_options(hf_folder: Path) -> None:
    from edgeserve.models.convert.cli import convert

    result = CliRunner().invoke(convert, ["default", "--to", "hf"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(hf_folder)
    refused = CliRunner().invoke(convert, ["default", "--to", "hf", "--quantize", "4"])
    assert refused.exit_code == 2 and "takes no options" in refused.output


def test_cli_module_imports_no_numeric_stack() -> None:
    code = (
        "import sys, edgeserve.models.convert.cli;"
        "print(sorted(m for m in ('mlx', 'mlx_lm', 'torch', 'transformers', 'tokenizers', 'gguf') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_architecture_is_read_from_the_header_alone(gguf_path: Path, tmp_path: Path) -> None:
    from edgeserve.models.convert import archs

    assert archs.gguf_architecture(gguf_path) == "gemma3" and archs.supported(gguf_path)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(gguf_path.open("rb").read(30))
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"ABCD" + bytes(100))
    assert archs.gguf_architecture(truncated) is None and not archs.supported(not_gguf)
