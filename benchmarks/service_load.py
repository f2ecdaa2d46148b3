"""Bounded load test of `de3bert serve` on 127.0.0.1, with and without micro-batching.

Starts the service in a subprocess for each mode, then for each concurrency level runs that many
clients, each sending one-sentence requests back to back, until the request budget or the time
limit is spent. Every answer is checked against the engine's answer for the same sentence
(computed in this process), so lost, mixed-up or reordered responses are counted, not assumed.
Writes results/service/load.json and load.png.

    .venv/bin/python benchmarks/service_load.py runs/demo-sst2 --requests 600 --concurrency 1 8 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from de3bert.data import load_split  # noqa: E402
from de3bert.engine import EarlyExitEngine  # noqa: E402
from de3bert.modeling import EarlyExitModel  # noqa: E402

OUT = Path("results") / "service"


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(checkpoint: str, port: int, micro_batching: bool) -> subprocess.Popen:
    """The service in a subprocess, once /healthz answers."""
    command = [sys.executable, "-m", "de3bert.cli", "serve", checkpoint, "--port", str(port), "--max-inputs", "64"]
    if not micro_batching:
        command.append("--no-micro-batching")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the service did not start")


async def load(url: str, texts: list[str], expected: list[tuple], concurrency: int, requests: int,
               duration: float) -> dict:
    """Run `concurrency` clients until `requests` are answered or `duration` seconds pass."""
    latencies, errors, wrong = [], 0, 0
    issued = 0
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def worker() -> None:
            nonlocal issued, errors, wrong
            while issued < requests and time.perf_counter() < deadline:
                index = issued % len(texts)
                issued += 1
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/predict", json={"inputs": [{"text": texts[index]}]})
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors += 1
                    continue
                answer = response.json()["predictions"][0]
                wrong += (answer["label"], answer["exit_layer"]) != expected[index]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors, "wrong_answers": wrong,
            "seconds": elapsed, "throughput_rps": len(latencies) / elapsed,
            "latency_p50_ms": 1000 * statistics.median(ordered),
            "latency_p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def plot(report: dict, path: Path) -> None:
    """Throughput and p99 latency against concurrency, with and without micro-batching."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, rows in report["modes"].items():
        levels = [r["concurrency"] for r in rows]
        left.plot(levels, [r["throughput_rps"] for r in rows], marker="o", label=mode)
        right.plot(levels, [r["latency_p99_ms"] for r in rows], marker="o", label=mode)
    for axis, label in ((left, "requests / s"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"de3bert serve on 127.0.0.1: {report['checkpoint']} ({report['task']} dev sentences)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default="runs/demo-sst2", help="checkpoint folder to serve")
    parser.add_argument("--requests", type=int, default=600, help="requests per concurrency level")
    parser.add_argument("--duration", type=float, default=60.0, help="time limit per concurrency level (s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64], help="concurrent clients")
    parser.add_argument("--data-dir", help="GLUE folder (default: $GLUE_DIR, else ../shared/data/glue)")
    args = parser.parse_args()
    model = EarlyExitModel.from_pretrained(args.checkpoint)
    task, examples = load_split(model.config.task, "dev", args.data_dir)
    if examples[0].text_b is not None:
        raise SystemExit("the load test sends single sentences; use a single-sentence task's checkpoint")
    texts = [e.text_a for e in examples[:256]]
    expected = [(p.label, p.exit_layer) for p in EarlyExitEngine(model).predict(texts)]
    report = {"checkpoint": args.checkpoint, "task": task.name, "requests_per_level": args.requests,
              "duration_limit_s": args.duration, "modes": {}}
    for mode, micro_batching in (("micro-batching", True), ("one request at a time", False)):
        port = free_port()
        process = start_service(args.checkpoint, port, micro_batching)
        try:
            rows = []
            for concurrency in args.concurrency:
                rows.append(asyncio.run(load(f"http://127.0.0.1:{port}", texts, expected, concurrency,
                                             args.requests, args.duration)))
                print(mode, json.dumps(rows[-1]), flush=True)
            report["modes"][mode] = rows
        finally:
            process.terminate()
            process.wait(timeout=30)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "load.json").write_text(json.dumps(report, indent=2))
    plot(report, OUT / "load.png")


if __name__ == "__main__":
    main()
