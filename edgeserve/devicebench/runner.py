"""The whole report: the device, its measured memory bandwidth, and each backend's rates and their
share of the bandwidth roofline. Returns the JSON document ``edgeserve.devicebench`` describes."""

from __future__ import annotations

import importlib
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edgeserve.backend import REGISTRY, get_spec
from edgeserve.devicebench.measure import SAMPLED, PeakRss, one_run, prompt_tokens, summarize
from edgeserve.devicebench.roofline import (
    GPU_BANDWIDTH_NOTE,
    Bandwidth,
    Weights,
    folder_weights,
    gguf_weights,
    measure_bandwidth,
    roofline_tok_s,
)
from edgeserve.errors import EdgeserveError
from edgeserve.settings import EngineSettings, ModelSettings
from edgeserve.types import ResolvedModel

log = logging.getLogger(__name__)
SCHEMA = "edgeserve.device_report/1"
DEFAULT_CONTEXTS = (128, 512, 2048)
#: Tokens a warm-up run prefills and decodes: pages the weights in, allocates the buffers.
WARMUP = (32, 4)


class BenchSettings(BaseSettings):
    """What ``edgeserve bench`` measures (env ``EDGESERVE_BENCH_*``); the model comes from ModelSettings."""

    model_config = SettingsConfigDict(env_prefix="EDGESERVE_BENCH_", extra="forbid", validate_default=True)

    backends: str = Field("", description="Backends to measure, comma-separated (default: every installed one).")
    contexts: str = Field(
        ",".join(map(str, DEFAULT_CONTEXTS)), description="Context lengths in tokens, comma-separated."
    )
    decode_tokens: int = Field(64, ge=1, description="Tokens decoded (greedily) after each prefill.")
    reps: int = Field(3, ge=1, description="Runs per context; the report gives medians.")
    out: Path = Field(Path("device_report.json"), description="JSON report path (the PNG goes beside it).")
    png: bool = Field(True, description="Also draw the report as a PNG (needs matplotlib: edgeserve[bench]).")
    breakdown: bool = Field(True, description="llama.cpp on a CPU: time the lm_head and the sampler in a step.")

    @field_validator("backends")
    @classmethod
    def _known_backends(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown backend {unknown[0]!r}; choose from {', '.join(REGISTRY)}")
        return ",".join(names)

    @field_validator("contexts")
    @classmethod
    def _context_list(cls, value: str) -> str:
        try:
            sizes = [int(n) for n in value.split(",") if n.strip()]
        except ValueError:
            raise ValueError(f"must be whole numbers separated by commas, like 128,512,2048, not {value!r}") from None
        if not sizes or min(sizes) < 8:
            raise ValueError("give at least one context of 8 tokens or more")
        return ",".join(map(str, sorted(set(sizes))))

    def backend_names(self) -> list[str]:
        return self.backends.split(",") if self.backends else [n for n in REGISTRY if get_spec(n).installed()]

    def context_list(self) -> list[int]:
        return [int(n) for n in self.contexts.split(",")]


@dataclass(frozen=True)
class Plan:
    bench: BenchSettings
    model: ModelSettings
    command: str = ""

    @property
    def contexts(self) -> list[int]:
        return self.bench.context_list()

    @property
    def decode_tokens(self) -> int:
        return self.bench.decode_tokens

    @property
    def reps(self) -> int:
        return self.bench.reps


def run_report(plan: Plan, say: Callable[[str], None] = log.info) -> dict[str, Any]:
    from edgeserve.hardware import probe

    hw = probe()
    loads = [_loadavg()]
    threads = plan.model.threads
    say(f"measuring memory bandwidth (1..{threads} threads)")
    bandwidth = measure_bandwidth(sorted({1, threads}))
    backends: dict[str, Any] = {}
    for name in plan.bench.backend_names():
        say(f"{name}: loading")
        backends[name] = bench_backend(name, plan, bandwidth, say)
        loads.append(_loadavg())
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "edgeserve": _version(),
        "command": plan.command,
        "device": {
            "system": hw.system,
            "machine": hw.machine,
            "cpu": _cpu_name(),
            "physical_cores": hw.physical_cores,
            "logical_cores": hw.logical_cores,
            "memory_bytes": hw.memory_bytes,
            "cuda": hw.cuda,
            "metal": hw.metal,
            "python": sys.version.split()[0],
            "nice": _nice(),
            "load_avg_1m": loads,
        },
        "memory_bandwidth": bandwidth.as_json(),
        "settings": {
            "model": plan.model.model,
            "contexts": list(plan.contexts),
            "decode_tokens": plan.decode_tokens,
            "reps": plan.reps,
            "threads": threads,
            "threads_pinned": plan.model.threads_pinned,
        },
        "backends": backends,
    }
    llama = backends.get("llama", {})
    if plan.bench.breakdown and llama.get("status") == "ok" and llama["device"] == "cpu":
        from edgeserve.devicebench.breakdown import llama_breakdown

        say("llama: where a decode step's time goes")
        context = min(512, max(plan.contexts))
        llama["breakdown"] = llama_breakdown(
            Path(llama["model_path"]), context, sorted({1, threads}), bandwidth, llama["weights"]
        )
    return report


def bench_backend(name: str, plan: Plan, bandwidth: Bandwidth, say: Callable[[str], None]) -> dict[str, Any]:
    spec = get_spec(name)
    if not spec.installed():
        return {"status": "skipped", "reason": f"not installed (pip install 'edgeserve[{spec.extra}]')"}
    from edgeserve.engine import Engine

    settings = plan.model.model_copy(update={"backend": name, "n_ctx": max(plan.contexts) + plan.decode_tokens + 16})
    contexts: list[dict[str, Any]] = []
    try:
        with PeakRss() as rss:
            start = time.perf_counter()
            engine = Engine.from_settings(settings, EngineSettings(policy="fcfs", predict_lengths=False))
            load_s = time.perf_counter() - start
            with engine:
                caps, resolved = engine.capabilities, engine.model
                tokens = prompt_tokens(engine, max(plan.contexts))
                one_run(engine, tokens[: WARMUP[0]], WARMUP[1])
                for context in plan.contexts:
                    say(f"{name}: context {context} x {plan.reps}")
                    runs = [one_run(engine, tokens[:context], plan.decode_tokens) for _ in range(plan.reps)]
                    contexts.append(summarize(runs))
                sampling = _sampling_cost(engine, tokens[: plan.contexts[0]], plan)
    except (EdgeserveError, OSError, RuntimeError) as exc:
        log.warning("%s failed: %s", name, exc)
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    assert resolved is not None
    weights = _weights(name, resolved, settings)
    on_cpu = caps.device == "cpu"
    gbs = bandwidth.ceiling(settings.threads) if on_cpu else None
    for row in contexts:
        per_token = weights.read_per_token + (row["kv_bytes"] or 0)
        roof = roofline_tok_s(gbs, per_token)
        row["bytes_read_per_token"] = per_token
        row["roofline_tok_s"] = roof
        row["roofline_pct"] = 100 * row["decode_tok_s"] / roof if roof else None
    kv = _kv_rate(contexts)
    return {
        "status": "ok",
        "device": caps.device,
        "threads": settings.threads,
        "model_path": str(resolved.path),
        "load_s": load_s,
        "rss_before_load_bytes": rss.before,
        "peak_rss_bytes": rss.peak,
        "peak_rss_added_bytes": rss.peak - rss.before,
        "weights": weights.as_json(),
        "bandwidth_gbs": gbs,
        "bandwidth_note": None if on_cpu else GPU_BANDWIDTH_NOTE,
        "kv_bytes_per_token": kv,
        "kv_note": None
        if kv is not None
        else "park carries tokens (replayed on restore), not KV: KV not counted in the roofline",
        "contexts": contexts,
        "default_sampling": sampling,
    }


def _kv_rate(contexts: list[dict[str, Any]]) -> float | None:
    """KV bytes each further token adds at the longest contexts measured (the slope between the
    two longest; with one context, its average). Not the average: sliding-window layers stop
    growing past their window (Gemma 3: 5 layers of 6 past 512 tokens), so KV grows slower there."""
    rows = [r for r in contexts if r["kv_bytes"] is not None]
    if len(rows) < 2:
        return rows[0]["kv_bytes_per_token"] if rows else None
    a, b = rows[-2], rows[-1]
    return float((b["kv_bytes"] - a["kv_bytes"]) / max(b["state_tokens"] - a["state_tokens"], 1))


def _sampling_cost(engine: Any, tokens: list[int], plan: Plan) -> dict[str, Any]:
    """Greedy and the default sampling chain, run alternately at the first context (so that a
    busy machine slows both alike): what picking a token costs beyond the model."""
    greedy, sampled = [], []
    for _ in range(plan.reps):
        greedy.append(one_run(engine, tokens, plan.decode_tokens))
        sampled.append(one_run(engine, tokens, plan.decode_tokens, SAMPLED))
    g, s = summarize(greedy)["decode_tok_s"], summarize(sampled)["decode_tok_s"]
    return {
        "context": len(tokens),
        "params": "top_k 40, top_p 0.95, temperature 0.8",
        "decode_tok_s": s,
        "greedy_decode_tok_s": g,
        "sampling_ms_per_token": (1 / s - 1 / g) * 1e3,
    }


def _weights(name: str, resolved: ResolvedModel, settings: ModelSettings) -> Weights:
    """What one step reads: the folder a converting backend loaded (its ``model_folder``, cached
    by then), else the GGUF file itself."""
    module = importlib.import_module(get_spec(name).module)
    folder = getattr(module, "model_folder", None)
    if folder is not None:
        return folder_weights(folder(resolved, settings))
    if resolved.path.is_dir():
        return folder_weights(resolved.path)
    return gguf_weights(resolved.path)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # Windows has none
        return None


def _nice() -> int | None:
    try:
        return os.nice(0)
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgeserve")
    except PackageNotFoundError:
        return "unknown"
