"""`moda serve` under a bounded load on loopback: requests/s and p50/p99 latency, against calling
`MoDESystem` in-process.

    .venv/bin/python bench/serve_load.py [--system runs/demo] [--requests 200] [--concurrency 8] [--pairs 4]

Load: `--requests` POST /classify requests of one image each (the demo's test images in turn, JPEG
as base64) and one class list (the shapes task's), from `--concurrency` client threads with httpx on
127.0.0.1; each request's latency from send to parsed answer. Peer, named: the same requests made
in-process one after another, the work a server does per request without HTTP (the base64 image
decoded, preprocessed, every expert's features, the ensemble's top classes; the class list's routing
and text features computed once, as the server caches them). The server (`moda serve`, its own
process, started once and warmed) and the client share the machine's cores, as on a one-box
deployment. Pairs interleaved, order alternating (bench/pairs.py); the ratio is served / in-process
requests/s.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pairs import Ratio, alternate  # noqa: E402
from evaluation.clip_features import image_features  # noqa: E402
from evaluation.tasks import load_tasks  # noqa: E402
from pipelines.run.demo import free_port  # noqa: E402
from serving.predict import MoDESystem  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", default="runs/demo")
    parser.add_argument("--tasks", default="data/demo/eval")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    task = next(t for t in load_tasks(args.tasks) if t.name == "shapes")
    raws = []
    for image in task.images.decoded():
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        raws.append(base64.b64encode(buffer.getvalue()).decode())
    payloads = [{"images": [raws[i % len(raws)]], "classes": task.classnames, "templates": task.templates,
                 "top_k": 3} for i in range(args.requests)]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pipelines.run.cli", "serve", args.system, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          limits=httpx.Limits(max_connections=args.concurrency))
    try:
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None:
                    raise SystemExit("moda serve exited before it answered /health") from None
                time.sleep(0.2)
        for payload in payloads[:args.concurrency]:  # warm: the class list's text features, first batches
            client.post("/classify", json=payload).raise_for_status()
        system = MoDESystem.load(args.system)
        ready = system.classifier(task.classnames, task.templates)

        def served(_: int) -> dict:
            def one(payload: dict) -> float:
                started = time.perf_counter()
                response = client.post("/classify", json=payload)
                response.raise_for_status()
                response.json()
                return time.perf_counter() - started

            started = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                latencies = list(pool.map(one, payloads))
            return {"rps": len(payloads) / (time.perf_counter() - started), "latencies": latencies}

        def in_process(_: int) -> dict:
            latencies = []
            started = time.perf_counter()
            for payload in payloads:
                t0 = time.perf_counter()
                image = Image.open(io.BytesIO(base64.b64decode(payload["images"][0]))).convert("RGB")
                probs = system.scores(ready, [image_features(system.model(e), [image]) for e in ready.experts])
                np.argsort(-probs, axis=1)[:, :3]
                latencies.append(time.perf_counter() - t0)
            return {"rps": len(payloads) / (time.perf_counter() - started), "latencies": latencies}

        print(f"# {platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; {' '.join(sys.argv)}")

        def report(r: int, a: dict, b: dict) -> None:
            ms = {side: [percentile(x["latencies"], q) * 1000 for q in (50, 99)] for side, x in (("a", a), ("b", b))}
            print(f"pair {r + 1}: served {a['rps']:.1f} req/s (p50 {ms['a'][0]:.0f} ms, p99 {ms['a'][1]:.0f} ms); "
                  f"in-process {b['rps']:.1f} req/s (p50 {ms['b'][0]:.1f} ms, p99 {ms['b'][1]:.1f} ms)")

        pairs = alternate(served, in_process, args.pairs, report)
        print(Ratio("served / in-process requests/s", tuple(a["rps"] / b["rps"] for a, b in pairs)))
        for name, side in (("served", 0), ("in-process", 1)):
            lat = [x for pair in pairs for x in pair[side]["latencies"]]
            print(f"{name}: median {statistics.median(p[side]['rps'] for p in pairs):.1f} req/s, latency p50 "
                  f"{percentile(lat, 50) * 1000:.1f} ms, p99 {percentile(lat, 99) * 1000:.1f} ms over all pairs")
        calls = client.get("/info").json()["model_calls"]
        print(f"server model calls: {calls} for {args.requests * args.pairs + args.concurrency} requests x "
              f"{len(ready.experts)} experts (unbatched: one call per request per expert)")
    finally:
        client.close()
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
