"""Packaging: a curated public API, and backends/ models/ installed under edgeserve."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import edgeserve

ROOT = Path(__file__).resolve().parents[1]


def test_public_api_is_exactly_all() -> None:
    public = {n for n in dir(edgeserve) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(edgeserve, n)).__name__ == "module"}
    assert set(edgeserve.__all__) == public - modules
    assert sorted(edgeserve.__all__) == edgeserve.__all__


def test_wheel_maps_backends_and_models_under_edgeserve(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("edgeserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "edgeserve/backends/llama.py" in names
    assert "edgeserve/models/resolve.py" in names
    assert "edgeserve/models/length_predictor.onnx" in names
    # Every package folder of the tree ships, under its installed name.
    installed = {"edgeserve": "edgeserve", "backends": "edgeserve/backends", "models": "edgeserve/models"}
    for top, prefix in installed.items():
        for init in (ROOT / top).rglob("__init__.py"):
            shipped = prefix + "/" + init.relative_to(ROOT / top).as_posix()
            assert shipped in names, f"{init.relative_to(ROOT)} is not in the wheel: list its package in pyproject"
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"edgeserve"}, f"the wheel claims top-level names {sorted(top - {'edgeserve'})}"


def test_core_import_pulls_in_no_backend_stack() -> None:
    code = (
        "import sys, edgeserve, edgeserve.cli, edgeserve.engine;"
        "print(sorted(m for m in ('llama_cpp', 'mlx', 'onnxruntime_genai') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _requirement_names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[\[<>=!~;\s]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_base_install_serves_and_proxies() -> None:
    """`edgeserve serve` and `edgeserve proxy` work after the README's first command (`pip install -e .`)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _requirement_names(project["dependencies"])
    assert {"fastapi", "uvicorn", "sse-starlette", "prometheus-client", "httpx", "aiohttp"} <= base
    assert any(r.startswith("uvicorn[standard]") for r in project["dependencies"])
    # The old extra stays installable as an empty alias, and nothing tells users to install it.
    assert project["optional-dependencies"]["server"] == []
    for path in [*(ROOT / "edgeserve").rglob("*.py"), ROOT / "README.md"]:
        assert "edgeserve[server]" not in path.read_text(), f"{path.relative_to(ROOT)} still asks for the server extra"
