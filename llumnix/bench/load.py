"""Load on the serving frontend: many concurrent requests, each checked, and the dispatch overhead per request.

``run_load`` sends ``n`` completion requests at once (each its own connection) to a running frontend and checks that
every one comes back with exactly ``max_tokens`` tokens; ``load_test`` does it against a fresh in-process frontend
(``BackgroundServer``; Ray must be initialised) and then checks the cluster itself: the frontend counted every request
as finished, holds none, and every instance is empty with all its KV blocks free. Dispatch overhead is the frontend's
own measurement per request: the dispatch policy's choice over the latest load reports, plus the instance actor's
acknowledgement of the request.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llumnix.profiles import DEFAULT_PROFILE


@dataclass
class LoadResult:
    requests: int
    completed: int = 0  # answered with exactly max_tokens tokens
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.requests - self.completed


async def _one(client, url: str, i: int, prompt: list[int], max_tokens: int, stream: bool, result: LoadResult) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}
    start = time.perf_counter()
    first = None
    tokens: list[int] = []
    try:
        if stream:
            async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    result.errors.append(f"request {i}: HTTP {resp.status_code}: {text[:200]}")
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:
                        result.errors.append(f"request {i}: {chunk['error'].get('message')}")
                        return
                    ids = chunk["choices"][0]["token_ids"]
                    if ids and first is None:
                        first = time.perf_counter() - start
                    tokens += ids
        else:
            resp = await client.post(f"{url}/v1/completions", json=body)
            if resp.status_code != 200:
                result.errors.append(f"request {i}: HTTP {resp.status_code}: {resp.text[:200]}")
                return
            tokens = resp.json()["choices"][0]["token_ids"]
    except Exception as e:
        result.errors.append(f"request {i}: {e!r}")
        return
    e2e = time.perf_counter() - start
    if len(tokens) != max_tokens:
        result.errors.append(f"request {i}: got {len(tokens)} of {max_tokens} tokens")
        return
    result.completed += 1
    result.e2e_s.append(e2e)
    result.ttft_s.append(first if first is not None else e2e)


async def run_load(
    url: str, n: int, prompt_tokens: int = 16, max_tokens: int = 8, stream: bool = True, seed: int = 0,
    vocab_size: int = 1000, timeout_s: float = 600.0,
) -> LoadResult:
    """Send ``n`` requests at once and wait for all of them."""
    import httpx

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab_size, prompt_tokens).tolist() for _ in range(n)]
    result = LoadResult(n)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(_one(client, url, i, p, max_tokens, stream, result) for i, p in enumerate(prompts)))
        result.wall_s = time.perf_counter() - t0
    return result


def _ms(values: list[float], q: float | None = None) -> float:
    if not values:
        return float("nan")
    return float(np.mean(values) if q is None else np.percentile(values, q)) * 1e3


def load_test(
    n: int,
    instances: int = 4,
    profile: str = DEFAULT_PROFILE,
    speed: float = 1.0,
    prompt_tokens: int = 16,
    max_tokens: int = 8,
    stream: bool = True,
    policy: str = "llumnix",
    seed: int = 0,
) -> dict[str, Any]:
    """``n`` concurrent requests against a fresh frontend over ``instances`` profile-backend instances (Ray must be
    initialised); returns one row of measurements and checks (``ok`` is all of them)."""
    from llumnix.fields import default_of
    from llumnix.runtime.frontend import BackgroundServer
    from llumnix.runtime.serve_config import ServeConfig, build_serve_config

    config = build_serve_config(
        {},
        {"instances": instances, "port": 0, "backend": "profile", "profile": profile, "speed": speed,
         "num_cpus_per_instance": 0, "policy": policy,
         "max_active_requests": max(n, default_of(ServeConfig, "max_active_requests"))},  # all n at once
    )  # fmt: skip
    with BackgroundServer(config) as server:
        result = asyncio.run(run_load(server.url, n, prompt_tokens, max_tokens, stream, seed))
        m = server.manager
        # The frontend's view: every request counted, finished, none left behind; each instance empty, blocks free.
        deadline = time.monotonic() + 10
        while m.active and time.monotonic() < deadline:
            time.sleep(0.05)
        checks = asyncio.run(m.check_instances())  # Ray object refs can be awaited from any event loop
        d, c = m.dispatch_latency, m.decision_latency
        leftover = sum(len(v["running"]) + len(v["waiting"]) + len(v["frozen"]) for v in checks.values())
        blocks_held = sum(v["num_blocks"] - v["free_blocks"] for v in checks.values())
        row = {
            "requests": n,
            "concurrent": n,
            "instances": instances,
            "backend": f"profile:{profile} x{speed:g}",
            "policy": policy,
            "prompt_tokens": prompt_tokens,
            "max_tokens": max_tokens,
            "stream": stream,
            "completed": result.completed,
            "errors": len(result.errors),
            "lost": result.lost,
            "frontend_requests": m.counters["requests"],
            "frontend_finished": m.counters["finished"],
            "frontend_failed": m.counters["failed"],
            "frontend_active_after": len(m.active),
            "instance_requests_after": leftover,
            "kv_blocks_held_after": blocks_held,
            "dispatch_count": d.count,
            "dispatch_mean_ms": d.mean_s * 1e3,
            "dispatch_p50_ms": d.quantile(0.5) * 1e3,
            "dispatch_p99_ms": d.quantile(0.99) * 1e3,
            "decision_mean_ms": c.mean_s * 1e3,
            "decision_p99_ms": c.quantile(0.99) * 1e3,
            "ttft_mean_ms": _ms(result.ttft_s),
            "ttft_p99_ms": _ms(result.ttft_s, 99),
            "e2e_mean_ms": _ms(result.e2e_s),
            "e2e_p99_ms": _ms(result.e2e_s, 99),
            "wall_s": result.wall_s,
            "error_examples": " | ".join(result.errors[:3]),
        }
    row["ok"] = (
        result.completed == n and not result.errors and row["frontend_finished"] == n and row["frontend_failed"] == 0
        and row["frontend_active_after"] == 0 and leftover == 0 and blocks_held == 0 and d.count == n
    )  # fmt: skip
    return row

