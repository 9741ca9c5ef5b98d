"""Structured output (issue 17): decode overhead of the grammar mask per backend, validity of
schema-constrained answers, and the time to compile a schema, cold and cached.

- **Overhead.** The same prompt decodes ``--tokens`` tokens unconstrained (``ignore_eos``) and under a
  JSON schema whose answer cannot close before then (an array of at least 200 strings), alternating,
  ``--reps`` times each; the figure is the median constrained decode tok/s over the median
  unconstrained one (target >= 0.9). The mask alone is timed too: the constrained tokens replayed
  through a fresh constraint over a random logits row (median microseconds per token).
- **Validity.** ``--requests`` chat requests spread over ten schemas (nested objects, arrays, enums,
  bounded numbers, required fields), sampled at temperature 0.8 with a seed each, on llama.cpp; every
  answer must parse and validate with ``jsonschema``.
- **Compile.** Each schema compiled by a fresh compiler (cold: llguidance builds the grammar) and
  again (cached: an LRU hit and a copy of the template matcher); the vocabulary (built once per model
  from the backend's detokenize) is timed apart.

    nice -n 10 python bench/structured.py [--backends llama,mlx,onnx] [--requests 200] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import jsonschema
import numpy as np

from edgeserve import Engine, FinishReason, SamplingParams
from edgeserve.backend import get_spec
from edgeserve.settings import EngineSettings, ModelSettings
from edgeserve.structured import GrammarCompiler, StructuredOutput, plan

OUT = Path(__file__).resolve().parent / "structured.json"
STR = {"type": "string", "maxLength": 24}
SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {"name": STR, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    "address": {
        "type": "object",
        "properties": {
            "street": STR,
            "city": STR,
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"enum": ["FR", "DE", "IT", "ES"]},
        },
        "required": ["street", "city", "zip", "country"],
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"sku": STR, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["sku", "qty"],
                },
            },
        },
        "required": ["id", "items"],
    },
    "weather": {
        "type": "object",
        "properties": {
            "city": STR,
            "celsius": {"type": "number", "minimum": -50, "maximum": 60},
            "sky": {"enum": ["sunny", "cloudy", "rain", "snow"]},
        },
        "required": ["city", "celsius", "sky"],
    },
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue", "black"]}, "minItems": 1, "maxItems": 4},
    "review": {
        "type": "object",
        "properties": {
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "title": STR,
            "recommend": {"type": "boolean"},
        },
        "required": ["stars", "title", "recommend"],
    },
    "event": {
        "type": "object",
        "properties": {
            "name": STR,
            "when": {
                "type": "object",
                "properties": {
                    "day": {"type": "integer", "minimum": 1, "maximum": 31},
                    "month": {"type": "integer", "minimum": 1, "maximum": 12},
                },
                "required": ["day", "month"],
            },
            "online": {"type": "boolean"},
        },
        "required": ["name", "when", "online"],
    },
    "point": {
        "type": "object",
        "properties": {
            "x": {"type": "number", "minimum": 0, "maximum": 1},
            "y": {"type": "number", "minimum": 0, "maximum": 1},
            "label": {"anyOf": [STR, {"type": "null"}]},
        },
        "required": ["x", "y", "label"],
    },
    "book": {
        "type": "object",
        "properties": {
            "title": STR,
            "authors": {"type": "array", "items": STR, "minItems": 1, "maxItems": 2},
            "year": {"type": "integer", "minimum": 1450, "maximum": 2026},
        },
        "required": ["title", "authors", "year"],
    },
    "status": {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "code": {"enum": [200, 404, 500]},
            "detail": {"$ref": "#/$defs/detail"},
        },
        "required": ["ok", "code", "detail"],
        "$defs": {"detail": {"type": "object", "properties": {"message": STR}, "required": ["message"]}},
    },
}
#: Answers that cannot close within the overhead run's tokens: the whole run is under the mask.
#: Strings with a maxLength are llguidance's slow case (no precomputed token slice fits them).
LONG = {
    "free_strings": {"type": "array", "items": {"type": "string"}, "minItems": 200},
    "bounded_strings": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 200},
}
PROMPT = "Here is a list of the fruits and vegetables sold at the market this morning, as JSON:"


def fmt(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def load(name: str, threads: int) -> Engine:
    return Engine.from_settings(
        ModelSettings(model="default", backend=name, n_ctx=2048, threads=threads), EngineSettings()
    )


def overhead(engine: Engine, tokens: int, reps: int) -> dict[str, Any]:
    """Unconstrained and each LONG schema in turn, ``reps`` rounds; the ratio is the median of each
    round's constrained / unconstrained decode rate (rounds are close in time: the machine is shared)."""
    free = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    engine.generate(PROMPT, free)  # warm
    for schema in LONG.values():
        engine.generate(PROMPT, free, response_format=fmt(schema))  # warm: the vocabulary and the grammar
    runs: dict[str, list[float]] = {"unconstrained": [], **{name: [] for name in LONG}}
    texts: dict[str, str] = {}
    for _ in range(reps):
        runs["unconstrained"].append(engine.generate(PROMPT, free).decode_tok_s or 0.0)
        for name, schema in LONG.items():
            b = engine.generate(PROMPT, free, response_format=fmt(schema))
            assert b.finish_reason is FinishReason.LENGTH and b.completion_tokens == tokens, b
            runs[name].append(b.decode_tok_s or 0.0)
            texts[name] = b.text
    base = runs["unconstrained"]
    return {
        "tokens": tokens,
        "decode_tok_s": runs,
        "median_decode_tok_s": {k: statistics.median(v) for k, v in runs.items()},
        "ratio": {name: statistics.median(c / u for c, u in zip(runs[name], base, strict=True)) for name in LONG},
        "mask_us_per_token": {name: mask_cost(engine, LONG[name], texts[name]) for name in LONG},
        "constrained_text_head": {name: text[:80] for name, text in texts.items()},
    }


def mask_cost(engine: Engine, schema: dict[str, Any], text: str) -> dict[str, float]:
    """The mask alone, computed in place (no overlap): the answer's tokens replayed through a fresh
    constraint; microseconds per token."""
    structured = StructuredOutput(engine.backend)
    constraint = structured.constraint(plan(fmt(schema)))
    assert constraint is not None
    structured.close()  # no worker: every mask computed in the timed call
    rng = np.random.default_rng(0)
    row = rng.standard_normal(engine.capabilities.n_vocab).astype(np.float32)
    times = []
    for token in engine.tokenize(text, add_bos=False):
        logits = row.copy()
        t0 = time.perf_counter()
        constraint.mask(logits)
        times.append((time.perf_counter() - t0) * 1e6)
        constraint.accept(token)
    return {"median": statistics.median(times), "p90": float(np.percentile(times, 90)), "max": max(times)}


def validity(engine: Engine, requests: int) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {}
    names = list(SCHEMAS)
    failures = []
    t0 = time.perf_counter()
    for i in range(requests):
        name = names[i % len(names)]
        schema = SCHEMAS[name]
        messages = [{"role": "user", "content": f"Write one {name} record as JSON."}]
        params = SamplingParams(max_tokens=256, temperature=0.8, seed=i)
        result = engine.generate(messages=messages, params=params, response_format=fmt(schema, name))
        row = per.setdefault(name, {"requests": 0, "valid": 0, "tokens": []})
        row["requests"] += 1
        row["tokens"].append(result.completion_tokens)
        try:
            jsonschema.validate(json.loads(result.text), schema)
            ok = result.finish_reason is FinishReason.STOP
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            ok = False
            failures.append(
                {
                    "schema": name,
                    "seed": i,
                    "finish": result.finish_reason.value,
                    "error": str(exc)[:200],
                    "text": result.text[:200],
                }
            )
        row["valid"] += ok
    valid = sum(r["valid"] for r in per.values())
    for row in per.values():
        row["median_tokens"] = statistics.median(row.pop("tokens"))
    return {
        "requests": requests,
        "valid": valid,
        "valid_fraction": valid / requests,
        "wall_s": time.perf_counter() - t0,
        "per_schema": per,
        "failures": failures,
    }


def compile_times(engine: Engine) -> dict[str, Any]:
    structured = StructuredOutput(engine.backend)
    t0 = time.perf_counter()
    vocabulary = structured.compiler.vocabulary
    vocab_s = time.perf_counter() - t0
    cold, cached = [], []
    for schema in SCHEMAS.values():
        spec = plan(fmt(schema))
        compiler = GrammarCompiler(lambda: vocabulary)
        t0 = time.perf_counter()
        compiler.constraint(spec.grammar or "", "response_format")  # type: ignore[union-attr]
        cold.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        compiler.constraint(spec.grammar or "", "response_format")  # type: ignore[union-attr]
        cached.append((time.perf_counter() - t0) * 1e3)
    plan_ms = []
    for schema in SCHEMAS.values():  # schema checks and grammar text, paid by every request
        t0 = time.perf_counter()
        plan(fmt(schema))
        plan_ms.append((time.perf_counter() - t0) * 1e3)
    return {
        "vocabulary_build_s": vocab_s,
        "cold_ms": dict(zip(SCHEMAS, cold, strict=True)),
        "cached_ms": dict(zip(SCHEMAS, cached, strict=True)),
        "median_cold_ms": statistics.median(cold),
        "median_cached_ms": statistics.median(cached),
        "median_request_validation_ms": statistics.median(plan_ms),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="llama,mlx,onnx")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per overhead run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only-overhead", action="store_true", help="rerun the overhead; keep the file's other parts")
    args = ap.parse_args()
    report: dict[str, Any] = {
        "benchmark": "structured",
        "command": "nice -n 10 python " + " ".join(sys.argv),
        "library": "llguidance " + __import__("llguidance").__version__,
        "model": "default (Gemma 3 270M; llama.cpp: Q4_K_M GGUF; MLX and ONNX: the cached conversions)",
        "threads": args.threads,
        "niceness": os.nice(0),
        "code": h.code_version(),
        "overhead": {},
        "skipped": {},
    }
    if args.only_overhead:  # compile and validity from the last full run, overhead and its command anew
        kept = json.loads(OUT.read_text())
        report = {**kept, **report, "full_run_command": kept.get("full_run_command", kept["command"])}
        report["overhead"] = dict(kept.get("overhead", {}))  # backends not named here keep their figures
        args.requests = 0
    for name in args.backends.split(","):
        spec = get_spec(name)
        if not spec.installed():
            report["skipped"][name] = f"not installed (pip install 'edgeserve[{spec.extra}]')"
            continue
        with load(name, args.threads) as engine:
            report["overhead"][name] = {"command": report["command"], **overhead(engine, args.tokens, args.reps)}
            print(
                name,
                json.dumps(report["overhead"][name]["median_decode_tok_s"]),
                json.dumps(report["overhead"][name]["ratio"]),
                flush=True,
            )
            if name == "llama" and not args.only_overhead:
                report["compile"] = compile_times(engine)
                print("compile", json.dumps(report["compile"]), flush=True)
                if args.requests:
                    report["validity"] = validity(engine, args.requests)
                    print("validity", report["validity"]["valid"], "/", args.requests, flush=True)
    report["load_average_1m_at_end"] = os.getloadavg()[0]
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(OUT)


if __name__ == "__main__":
    main()
