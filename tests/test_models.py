"""Model resolution against stores laid out on disk the way Ollama and Hugging Face lay them out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeserve.errors import ModelNotFoundError
from edgeserve.models import list_models, resolve

GGUF = b"GGUF" + b"\0" * 60


def ollama_store(root: Path, name: str, tag: str, namespace: str = "library") -> Path:
    digest = "sha256:" + "ab" * 32
    blob = root / "blobs" / digest.replace(":", "-")
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(GGUF)
    manifest = root / "manifests" / "registry.ollama.ai" / namespace / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "layers": [
                    {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32},
                    {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": len(GGUF)},
                ],
            }
        )
    )
    return blob


def hf_cache(root: Path, repo: str, files: list[str]) -> Path:
    folder = root / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in files:
        (snap / f).write_bytes(GGUF)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    return snap


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    ollama, hf = tmp_path / "ollama", tmp_path / "hf"
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    return ollama, hf


def test_ollama_name_resolves_to_the_model_blob(stores: tuple[Path, Path], tmp_path: Path) -> None:
    blob = ollama_store(stores[0], "llama3.2", "1b")
    found = resolve("llama3.2:1b", cache_dir=tmp_path)
    assert found.path == blob and found.source == "ollama"


def test_ollama_default_tag_is_latest_and_namespaces_work(stores: tuple[Path, Path], tmp_path: Path) -> None:
    blob = ollama_store(stores[0], "phi", "latest", namespace="someone")
    assert resolve("someone/phi", cache_dir=tmp_path).path == blob


def test_hf_cache_prefers_q4_k_m_and_accepts_a_selector(stores: tuple[Path, Path], tmp_path: Path) -> None:
    snap = hf_cache(stores[1], "org/tiny-GGUF", ["tiny.Q8_0.gguf", "tiny.Q4_K_M.gguf"])
    assert resolve("org/tiny-GGUF", cache_dir=tmp_path).path == snap / "tiny.Q4_K_M.gguf"
    assert resolve("org/tiny-GGUF:Q8_0", cache_dir=tmp_path).path == snap / "tiny.Q8_0.gguf"


def test_path_to_a_gguf_and_to_a_non_gguf(tmp_path: Path) -> None:
    good = tmp_path / "m.gguf"
    good.write_bytes(GGUF)
    assert resolve(str(good), cache_dir=tmp_path).source == "file"
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(ModelNotFoundError, match="not a GGUF"):
        resolve(str(bad), cache_dir=tmp_path)


def test_miss_names_every_place_looked(stores: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve("nosuch:7b", cache_dir=tmp_path)
    message = str(info.value)
    assert "'nosuch:7b'" in message
    assert str(stores[0] / "manifests") in message
    assert str(stores[1]) in message
    assert "Nothing is downloaded" in message


def test_list_models_finds_all_stores(stores: tuple[Path, Path], tmp_path: Path) -> None:
    ollama_store(stores[0], "llama3.2", "1b")
    hf_cache(stores[1], "org/tiny-GGUF", ["tiny.Q4_K_M.gguf"])
    names = {(e.source, e.name) for e in list_models(tmp_path)}
    assert ("ollama", "llama3.2:1b") in names
    assert ("huggingface", "org/tiny-GGUF:tiny.Q4_K_M.gguf") in names
    assert ("default", "default") in names


def test_default_model_is_assembled_once_and_verified(tmp_path: Path) -> None:
    first = resolve("default", cache_dir=tmp_path)
    stamp = first.path.with_suffix(".verified")
    assert first.path.stat().st_size > 200_000_000 and stamp.exists()
    mtime = first.path.stat().st_mtime_ns
    assert resolve("default", cache_dir=tmp_path).path.stat().st_mtime_ns == mtime  # reused, not rebuilt
