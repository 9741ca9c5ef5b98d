"""Backend choice for ``--backend auto``: MLX on Apple Silicon only for models it can take."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from edgeserve import hardware
from edgeserve.hardware import Hardware, choose_backend

MAC = Hardware("Darwin", "arm64", 8, 8, 16 << 30, 8 << 30, cuda=False, metal=True)
LINUX = Hardware("Linux", "x86_64", 2, 2, 24 << 30, 20 << 30, cuda=False, metal=False)


def tiny_gguf(path: Path, arch: str) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def mlx_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "installed_backends", lambda: {"llama": True, "mlx": True, "onnx": True})


def test_mlx_on_apple_silicon_for_a_model_it_converts(mlx_installed: None, default_model_path: Path) -> None:
    assert choose_backend(MAC, default_model_path) == "mlx"
    assert choose_backend(MAC, default_model_path.parent) == "mlx"  # a converted folder
    assert choose_backend(LINUX, default_model_path) == "llama"


def test_llama_for_an_architecture_mlx_cannot_take(mlx_installed: None, tmp_path: Path) -> None:
    assert choose_backend(MAC, tiny_gguf(tmp_path / "other.gguf", "llama")) == "llama"


def test_llama_when_mlx_is_missing(monkeypatch: pytest.MonkeyPatch, default_model_path: Path) -> None:
    monkeypatch.setattr(hardware, "installed_backends", lambda: {"llama": True, "mlx": False, "onnx": False})
    assert choose_backend(MAC, default_model_path) == "llama"


def test_the_core_names_no_concrete_backend() -> None:
    """hardware.py asks the registry; importing a backend module by name would tie the core to it."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(hardware))
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in imported if m.startswith("edgeserve.backends")]


def test_onnx_providers_come_through_the_registry() -> None:
    from edgeserve.backend import get_spec

    providers = hardware.onnx_execution_providers()
    if get_spec("onnx").installed():
        assert providers and providers[-1] == "cpu"
    else:
        assert providers == []
    assert get_spec("llama").providers() == []
