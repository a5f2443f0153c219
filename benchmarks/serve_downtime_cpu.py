"""The serving cluster's migration downtime on a CPU machine: `llumnix serve`'s two Ray instance actors (the tests'
tiny cluster, `tests/test_ray_cluster.cluster_config`), 8 requests one after another, each migrated once by
``POST /admin/migrate`` after 4 tokens; prints the committed migrations' downtime (freeze to commit on the source's
clock). Usage, from the repo root: ``.venv/bin/python benchmarks/serve_downtime_cpu.py gloo|object-store``. What
it measured is in benchmarks/logs/vm-serve-downtime-cpu.txt."""

import statistics
import sys

import httpx
import ray

sys.path.insert(0, "tests")
from test_ray_cluster import LONG_PROMPT, cluster_config, stream_live  # noqa: E402

from llumnix.runtime.frontend import BackgroundServer  # noqa: E402


def main(transport: str, requests: int = 8) -> None:
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with BackgroundServer(cluster_config(kv_transport=transport, kv_timeout_s=20.0)) as srv:
        downtimes_ms = []
        for i in range(requests):
            asked: list[dict] = []

            def on_chunk(chunk, tokens, asked=asked):
                if not asked and len(tokens) >= 4:
                    asked.append(httpx.post(f"{srv.url}/admin/migrate", json={"request_id": chunk["id"]}, timeout=30,
                                            headers=srv.admin_headers).json())

            _, final, _ = stream_live(srv.url, on_chunk, prompt=LONG_PROMPT[: 100 + 10 * i], max_tokens=60)
            downtimes_ms += [r["downtime_s"] * 1e3 for r in final["migration_records"] if r["committed"]]
    print(f"{transport}: {len(downtimes_ms)} of {requests} migrations committed, downtime median "
          f"{statistics.median(downtimes_ms):.2f} ms (min {min(downtimes_ms):.2f}, max {max(downtimes_ms):.2f})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gloo")
