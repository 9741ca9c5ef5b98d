"""Typed settings, one object per concern. Each field reads ``EDGESERVE_<FIELD>`` from the
environment; CLI flags are generated from these fields (see ``edgeserve.cli._options``), never the
other way round."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Aging threshold in units of a short request's service time. Chosen in the simulator on real answer
#: lengths with the profile measured here (bench/sim_policies.py): at 8x aging turned SJF back into
#: FCFS (short P50 gain 3% at rho 0.74); at 128x SJF kept a 56% (rho 0.74) and 65% (rho 0.9) short P50
#: gain while the long requests' P99 stayed within 1.11x of FCFS; without aging it grew to 2.4-4.8x.
AGING_FACTOR = 128.0
#: Log levels of the servers (uvicorn's names).
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


def physical_cores() -> int:
    """Physical cores: llama.cpp decode is memory-bound and hyper-threads only add contention."""
    import psutil

    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGESERVE_", extra="forbid", validate_default=True)


class ModelSettings(_Settings):
    model: str = Field(
        "default",
        description="Model: a .gguf path, 'default' (embedded Gemma 3 270M), an Ollama name "
        "(llama3.2:1b) or a Hugging Face repo in the local cache (org/name[:file-or-quant]).",
    )
    backend: Literal["auto", "llama", "mlx", "onnx"] = Field(
        "auto",
        description="Backend: llama (llama.cpp), mlx, onnx, or auto (best installed for this machine).",
    )
    n_ctx: int = Field(4096, ge=64, le=1 << 20, description="Context length in tokens.")
    threads: int = Field(
        default_factory=physical_cores,
        ge=1,
        description="CPU threads. Given, it is fixed; unset, the backend adapts the count to the measured decode "
        "step time, up to the physical cores (a busy machine gets fewer).",
    )
    n_batch: int = Field(512, ge=1, description="Prompt tokens evaluated per batch.")
    kv_unified: bool = Field(
        True,
        description="llama.cpp: one KV cache shared by all sequences (as llama-server), not a stream each. A "
        "batched step of 8 costs 0.67x the CPU of 8 streams here, but a sequence's greedy text may then depend on "
        "its batch neighbours and on where earlier sequences left cells; --no-kv-unified keeps it exact.",
    )
    parallel: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Sequences decoded together in one batched step (continuous batching). Given, it is fixed, "
        "each with a full context of KV cells; unset (llama.cpp), 16 sharing the cells of up to 8 full contexts as "
        "the KV memory budget (half the free memory) allows (a sequence is parked when they fill up), and the "
        "engine uses the largest count whose measured per-sequence decode rate stays above --parallel-floor-tok-s.",
    )
    gpu_layers: int = Field(-1, description="Layers offloaded to a GPU when one is present (-1: all).")
    flash_attn: bool | None = Field(
        None,
        description="llama.cpp flash attention. Unset: on where the device supports it (as llama-server's -fa auto) "
        "with the shared KV cache; off with --no-kv-unified, whose exact text it would give up (a prefix-cached "
        "prompt then gave other greedy text than a fresh one). A 16-sequence step took 0.75x the time with it here.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "edgeserve",
        description="Where assembled and converted models are kept (default: ~/.cache/edgeserve).",
    )

    @property
    def threads_pinned(self) -> bool:
        """``threads`` was given (argument, flag or ``EDGESERVE_THREADS``): keep it fixed. Otherwise
        it is the most a backend may use, and ``edgeserve.threads.ThreadTuner`` picks the count."""
        return "threads" in self.model_fields_set


class EngineSettings(_Settings):
    max_queue: int = Field(64, ge=1, description="Requests that may wait for the engine; more get 429.")
    policy: Literal["sjf", "srpt", "fcfs", "priority"] = Field(
        "sjf",
        description="Order: sjf (shortest predicted service time first), srpt (sjf that also preempts: "
        "shortest remaining first, the displaced request's KV state parked), fcfs, or priority (then sjf).",
    )
    aging_s: float | None = Field(
        None,
        gt=0,
        description="Seconds after which a waiting request runs next whatever its order (default: derived "
        "from the measured service time of short requests).",
    )
    aging_factor: float = Field(
        AGING_FACTOR, gt=0, description="Derived aging: this many times the service time of a short request."
    )
    adapt_log: Path | None = Field(
        None,
        description="Record (prompt features, real answer tokens) of served requests here for "
        "'edgeserve predictor adapt' (no prompt text is stored).",
    )
    predictor: Path | None = Field(
        None, description="Length predictor artefact (default: the shipped one; e.g. the output of adapt)."
    )
    predict_lengths: bool = Field(
        True,
        description="Predict answer lengths for sjf/srpt/priority (off: every answer counts as equally long, "
        "so srpt's gain comes from preemption alone).",
    )
    preempt_quantum_s: float = Field(
        0.1, ge=0, description="srpt: seconds a request keeps the device before anything may displace it."
    )
    preempt_hysteresis: float = Field(
        2.0,
        ge=1.0,
        description="srpt: a waiting request displaces the running one only when this many times shorter "
        "(its cost plus the park/restore cost against the running one's remaining cost).",
    )
    max_parked: int = Field(16, ge=0, description="srpt: requests whose KV state may be parked in host memory at once.")
    prefill_chunk: int = Field(256, ge=1, description="Prompt tokens evaluated between two scheduling decisions.")
    parallel_floor_tok_s: float = Field(
        5.0,
        gt=0,
        description="Automatic --parallel: batch no more sequences than keep each above this decode rate "
        "(tokens/s, about reading speed), and only while a wider batch still adds throughput.",
    )


class _FrontSettings(_Settings):
    """What both HTTP front ends (``serve`` and ``proxy``) take the same way: where they listen, who
    may call them, and the local-server guards (DNS rebinding, foreign browser origins)."""

    host: str = Field("127.0.0.1", description="Address to bind; loopback unless you mean it.")
    api_key: str | None = Field(None, description="Require 'Authorization: Bearer KEY' on every route but /health.")
    allowed_hosts: str = Field(
        "",
        description="Host names served besides loopback ones and --host, comma-separated ('*': any, which "
        "turns off the DNS-rebinding guard). IP-address Host headers need no listing.",
    )
    allowed_origins: str = Field(
        "",
        description="Browser origins allowed besides loopback ones, comma-separated, '*' globs allowed "
        "(https://app.example.com,http://*.lan:*; '*': any), as OLLAMA_ORIGINS. Others get 403.",
    )

    @field_validator("allowed_hosts", "allowed_origins")
    @classmethod
    def _comma_list(cls, value: str) -> str:
        return ",".join(item.strip().lower() for item in value.split(",") if item.strip())


class ServerSettings(_FrontSettings):
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest accepted request body in bytes.")
    log_prompts: bool = Field(False, description="Log prompt text (off: prompts are private).")
    log_level: LogLevel = Field("info", description="Server log level (access lines never carry prompt text).")
    header_timeout_s: float = Field(
        10.0, gt=0, description="Seconds a connection may take to send a request head (then 408 and close)."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Seconds a client may take to send a request body (then 408 and close)."
    )
    keep_alive_s: int = Field(5, ge=1, description="Seconds an idle keep-alive connection stays open.")
    max_connections: int = Field(
        2048, ge=1, description="Open connections at most; a connection beyond it is closed at once."
    )


class CloudSettings(_Settings):
    """Cloud-device split prefill (``edgeserve.handoff``): a cloud answers first, the device takes over."""

    # hide_input_in_errors: the cloud URL or key may carry a secret, and errors would quote it.
    model_config = SettingsConfigDict(
        env_prefix="EDGESERVE_", extra="forbid", validate_default=True, hide_input_in_errors=True
    )

    cloud: str | None = Field(
        None,
        description="OpenAI-compatible server (vLLM, SGLang, llama.cpp, another edgeserve serve) that answers "
        "first while the device prefills, e.g. http://gpu-box:8000 (unset: no cloud).",
    )
    cloud_model: str | None = Field(None, description="Model name to ask the cloud for (default: the served model's).")
    cloud_api_key: str | None = Field(None, description="Bearer key for the cloud.")
    handoff: Literal["auto", "off", "always"] = Field(
        "auto",
        description="auto: the planner picks local, token or KV handoff per request; always: use the cloud "
        "whenever it is allowed; off: never.",
    )
    ttft_target_s: float = Field(
        1.0,
        gt=0,
        description="Time to first token the planner aims for; a request the device meets it alone stays local.",
    )
    kv_handoff: bool = Field(
        True, description="Fetch the prompt's KV state from the cloud when it is an edgeserve serve on the same model."
    )
    cloud_token_share: float = Field(
        0.10,
        ge=0,
        le=1,
        description="Cloud-token budget: the planner prefers routes whose predicted cloud tokens stay within this "
        "share of max_tokens, and goes over it only when nothing within it meets the TTFT target.",
    )
    cloud_connect_timeout_s: float = Field(2.0, gt=0, description="Longest wait to connect to the cloud, in seconds.")
    cloud_first_token_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for the cloud's first token; then the device goes on alone."
    )
    cloud_chunk_timeout_s: float = Field(
        5.0, gt=0, description="Longest silence between two cloud chunks; then the device goes on alone."
    )

    @field_validator("cloud")
    @classmethod
    def _cloud_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value):
            raise ValueError("must be an http:// or https:// URL such as http://127.0.0.1:8000")
        return value.rstrip("/") if value else value


class ProxySettings(_FrontSettings):
    """The sidecar proxy: SJF admission in front of another server (env ``EDGESERVE_PROXY_*``)."""

    # hide_input_in_errors: the upstream URL may carry a password, and errors would quote it.
    model_config = SettingsConfigDict(
        env_prefix="EDGESERVE_PROXY_", extra="forbid", validate_default=True, hide_input_in_errors=True
    )

    upstream: str = Field(
        "http://127.0.0.1:11434",
        description="Server to front: Ollama (default), llama.cpp's server, vLLM, any OpenAI-compatible URL.",
    )
    port: int = Field(8081, ge=0, le=65535, description="Port to listen on.")
    policy: Literal["sjf", "fcfs", "priority"] = Field("sjf", description="Admission order of waiting requests.")
    max_inflight: int = Field(1, ge=1, description="Generation requests sent upstream at once (1: serial backend).")
    max_queue: int = Field(64, ge=1, description="Requests that may wait; more get 429.")
    aging_s: float | None = Field(
        None, gt=0, description="Aging threshold in seconds (default: derived from measured short requests)."
    )
    aging_factor: float = Field(
        AGING_FACTOR, gt=0, description="Derived aging: this many times a short request's time."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Seconds a client may take to send a generation request's body (then 408)."
    )
    upstream_api_key: str | None = Field(
        None,
        description="Bearer key sent upstream instead of the client's Authorization (credentials in the "
        "--upstream URL go as Basic auth the same way; with neither, the client's passes through).",
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Longest wait to connect to the upstream, in seconds.")
    first_byte_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Longest wait for an answer's first byte: a stream's prefill, a non-streamed answer whole.",
    )
    chunk_timeout_s: float = Field(
        30.0, gt=0, description="Longest silence between two chunks of a streamed answer, in seconds."
    )
    upstream_keepalive_s: float = Field(
        4.0, gt=0, description="Reuse an idle upstream connection for at most this long (below the upstream's own)."
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest generation request body in bytes (other routes pass through)."
    )
    adapt_log: Path | None = Field(
        None, description="Record (prompt features, real answer tokens) for 'edgeserve predictor adapt'."
    )
    log_level: LogLevel = Field("info", description="Proxy log level ('info' logs a line per request, never its text).")

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value):
            # The value is not echoed: it may carry credentials.
            raise ValueError("must be an http:// or https:// URL such as http://127.0.0.1:11434")
        return value

    @model_validator(mode="after")
    def _one_upstream_credential(self) -> ProxySettings:
        if self.upstream_api_key and "@" in self.upstream.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("give the upstream's credentials once: in --upstream's URL or as --upstream-api-key")
        return self

    predictor: Path | None = Field(
        None, description="Length predictor artefact (default: the shipped one; e.g. the output of adapt)."
    )
