"""What this machine has, and which backend suits it. Read-only probes; nothing here loads a model,
and no backend is imported by name: what a backend knows about itself comes through the registry."""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgeserve.backend import REGISTRY


@dataclass(frozen=True)
class Hardware:
    system: str
    machine: str
    physical_cores: int
    logical_cores: int
    memory_bytes: int
    available_bytes: int
    cuda: bool
    metal: bool

    @property
    def apple_silicon(self) -> bool:
        return self.system == "Darwin" and self.machine == "arm64"


def probe() -> Hardware:
    import psutil

    vm = psutil.virtual_memory()
    system, machine = platform.system(), platform.machine()
    return Hardware(
        system=system,
        machine=machine,
        physical_cores=psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
        logical_cores=psutil.cpu_count() or 1,
        memory_bytes=vm.total,
        available_bytes=vm.available,
        cuda=_has_cuda(),
        # Every Apple Silicon Mac has Metal; Intel Macs do too but MLX does not run on them.
        metal=system == "Darwin" and machine == "arm64",
    )


def _has_cuda() -> bool:
    # The driver's device nodes or its management tool: enough to say a CUDA GPU is present
    # without importing a CUDA library.
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def installed_backends() -> dict[str, bool]:
    return {name: spec.installed() for name, spec in REGISTRY.items()}


def onnx_execution_providers() -> list[str]:
    """Execution providers compiled into this ONNX Runtime GenAI install, best first (empty when the
    onnx backend is absent). Compiled in is not present: pair with ``probe()`` to pick one."""
    return REGISTRY["onnx"].providers()


def onnx_provider(hw: Hardware, compiled: list[str]) -> str | None:
    """The provider the onnx backend would use on this machine."""
    if not compiled:
        return None
    return "cuda" if hw.cuda and "cuda" in compiled else ("dml" if "dml" in compiled else "cpu")


def choose_backend(hw: Hardware | None = None, model: Path | None = None) -> str:
    """``auto``: MLX on Apple Silicon when installed (fastest there) and able to take the model (a
    converted folder, or a GGUF whose architecture the converter knows); llama.cpp everywhere else."""
    hw = hw or probe()
    if not (hw.apple_silicon and installed_backends().get("mlx")):
        return "llama"
    if model is None or model.is_dir():
        return "mlx"
    from edgeserve.models.convert.archs import supported

    return "mlx" if supported(model) else "llama"
