"""1,000 concurrent requests at ``edgeserve proxy`` (issue 19, "Overload"): only 200 and 429, the
proxy alive after, its peak RSS, and whether ``Retry-After`` told each refused client the truth.

Upstream: ``edgeserve serve`` on the default model (llama.cpp, one thread, first come first served);
the proxy: its own process (``--max-queue 64 --max-inflight 1``), so its RSS is its own. Requests:
real oasst1 prompts, each generating its real answer length scaled by ``--scale`` (ignore_eos), all
sent at once on 1,000 connections.

The real wait of a refused request is the wait it would have had if it had been queued: from its
refusal until every request waiting at that moment was admitted (each 200's admission is its send
time plus its ``x-queue-wait-ms``). Retry-After is within 2x when it lies in [W/2, 2W]. With
``--warm K``, K requests go through the proxy one by one first, so it has measured the upstream as a
proxy in service has; without, the first refusals rest on the service model's prior rates alone.

    python bench/proxy_overload.py [--n 1000] [--scale 0.03] [--warm 4]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import free_port, process, save, upstream, warm, workload, workload_rows


def rss_kb(pid: int) -> dict[str, int]:
    """Resident set now and at its peak (VmHWM), from the kernel."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


async def one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], t0: float) -> dict[str, Any]:
    sent = time.monotonic() - t0
    try:
        async with session.post(url, json=body) as r:
            await r.read()
            return {
                "sent_s": sent,
                "done_s": time.monotonic() - t0,
                "status": r.status,
                "retry_after": r.headers.get("retry-after"),
                "wait_ms": r.headers.get("x-queue-wait-ms"),
            }
    except (aiohttp.ClientError, OSError) as exc:
        return {"sent_s": sent, "done_s": time.monotonic() - t0, "status": None, "error": repr(exc)}


async def burst(proxy: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.monotonic()
        return await asyncio.gather(*(one(session, f"{proxy}/v1/completions", b, t0) for b in bodies))


def retry_after_truth(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each refusal's Retry-After against the time the queue it met took to drain."""
    admitted = [(r["sent_s"], r["sent_s"] + float(r["wait_ms"]) / 1000) for r in results if r["status"] == 200]
    ratios = []
    for r in results:
        if r["status"] != 429:
            continue
        refused = r["done_s"]
        ahead = [a for s, a in admitted if s <= refused < a]
        if not ahead:
            continue  # the queue was empty when it was refused (a slot freed in between)
        real = max(ahead) - refused
        ratios.append((float(r["retry_after"]), real))
    within = [1 for ra, w in ratios if w / 2 <= ra <= 2 * w]
    return {
        "refusals_compared": len(ratios),
        "within_2x": len(within),
        "within_2x_share": round(len(within) / len(ratios), 3) if ratios else None,
        "median_ratio_retry_after_to_real": round(statistics.median(ra / w for ra, w in ratios), 3) if ratios else None,
        "median_retry_after_s": statistics.median(ra for ra, _ in ratios) if ratios else None,
        "median_real_wait_s": round(statistics.median(w for _, w in ratios), 2) if ratios else None,
    }


def burst_service_s(results: list[dict[str, Any]]) -> float | None:
    admitted = sorted(r["sent_s"] + float(r["wait_ms"]) / 1000 for r in results if r["status"] == 200)
    gaps = [b - a for a, b in itertools.pairwise(admitted)]
    return round(statistics.median(gaps), 3) if gaps else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--scale", type=float, default=0.03, help="generated tokens per real answer token")
    parser.add_argument("--warm", type=int, default=4, help="requests through the proxy before the burst")
    parser.add_argument("--queue", type=int, default=64)
    args = parser.parse_args()
    total = args.n + args.warm
    base = workload(min(total, len(workload_rows())), args.scale, seed=19)  # 828 prompts: reused past that
    jobs = [base[i % len(base)] for i in range(total)]
    bodies = [
        {"model": "default", "prompt": j.prompt, "max_tokens": j.gen_tokens, "ignore_eos": True, "temperature": 0}
        for j in jobs
    ]
    with upstream(threads=1) as up:
        warm(up)
        port = free_port()
        proxy_args = ["proxy", "--upstream", up, "--port", str(port), "--max-queue", str(args.queue)]
        url = f"http://127.0.0.1:{port}"
        with process([*proxy_args, "--log-level", "warning"], f"{url}/health") as proc:
            warm_s = []
            for body in bodies[: args.warm]:
                t = time.monotonic()
                httpx.post(f"{url}/v1/completions", json=body, timeout=300).raise_for_status()
                warm_s.append(time.monotonic() - t)
            before = rss_kb(proc.pid)
            started = time.monotonic()
            results = asyncio.run(burst(url, bodies[args.warm :]))
            wall = time.monotonic() - started
            after = rss_kb(proc.pid)
            alive = proc.poll() is None and httpx.get(f"{url}/health", timeout=30).status_code == 200
            metrics = httpx.get(f"{url}/metrics", timeout=30).text
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    report = {
        "requests": args.n,
        "max_queue": args.queue,
        "max_inflight": 1,
        "scale": args.scale,
        "warm_requests": args.warm,
        "statuses": statuses,
        "only_200_and_429": set(statuses) <= {"200", "429"},
        "proxy_alive_after": alive,
        "proxy_rss_kb_before": before["VmRSS"],
        "proxy_rss_kb_after": after["VmRSS"],
        "proxy_peak_rss_kb": after["VmHWM"],
        "burst_wall_s": round(wall, 2),
        "retry_after": retry_after_truth(results),
        # Service per request: one at a time before the burst, and the gaps between admissions in it
        # (a shared machine's load moves between the two, and Retry-After can only know the first).
        "warm_service_s_median": round(statistics.median(warm_s), 3) if warm_s else None,
        "burst_service_s_median": burst_service_s(results),
        "proxy_requests_total": [x for x in metrics.splitlines() if x.startswith("edgeserve_proxy_requests_total")],
        "errors": [r["error"] for r in results if r.get("error")][:5],
    }
    path = save("proxy_overload", report)
    print({k: v for k, v in report.items() if k != "proxy_requests_total"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
