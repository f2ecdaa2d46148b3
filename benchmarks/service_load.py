"""Bounded load test of `de3bert serve` on 127.0.0.1, with and without micro-batching.

Starts the service in a subprocess for each mode, then for each concurrency level runs that many
clients, each sending one-input requests (dev sentences or sentence pairs of the checkpoint's task)
back to back, until the request budget or the time limit is spent. Each cell is run `--repeats`
times, alternating the two modes, and reported as medians, so that load from other jobs on a shared
machine hits both modes alike. Every answer is checked against
the engine's answer for the same input computed in this process (label, exit layer and class
probabilities), so lost, mixed-up or reordered responses are counted, not assumed. The service's
per-request log lines give the micro-batch each request was served in and the latency the service
itself measured (queue + engine), next to the latency the clients saw. Writes
results/service/load.json and load.png.

    .venv/bin/python benchmarks/service_load.py runs/demo-sst2 --requests 300 --repeats 3 --concurrency 1 8 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from de3bert.data import load_split  # noqa: E402
from de3bert.exits.engine import EarlyExitEngine  # noqa: E402
from de3bert.model.modeling import EarlyExitModel  # noqa: E402

OUT = Path("results") / "service"
DISTINCT_INPUTS = 256
PROBABILITY_TOLERANCE = 1e-4  # batch composition changes the float rounding, never the answer beyond this


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(checkpoint: str, port: int, micro_batching: bool, max_wait_ms: float, log: Path) -> subprocess.Popen:
    """`de3bert serve` in a subprocess logging to `log`, returned once /healthz answers."""
    command = [sys.executable, "-m", "de3bert.cli", "serve", checkpoint, "--port", str(port),
               "--max-wait-ms", str(max_wait_ms)]
    if not micro_batching:
        command.append("--no-micro-batching")
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the service did not start; its log: {log}")


def matches(answer: dict, expected) -> bool:
    """Whether a served answer is the engine's answer for the same input."""
    return (answer["label"] == expected.label and answer["exit_layer"] == expected.exit_layer
            and all(abs(answer["probabilities"][k] - v) <= PROBABILITY_TOLERANCE
                    for k, v in expected.probabilities.items()))


async def load(url: str, inputs: list[dict], expected: list, concurrency: int, requests: int, duration: float) -> dict:
    """Run `concurrency` clients until `requests` are answered or `duration` seconds pass.

    Each client has its own httpx.AsyncClient with one connection: one pool shared by 64 clients
    spent more CPU on its own bookkeeping than the service on its answers (encode/httpx#3215) and
    showed multi-second latencies the service never had."""
    latencies, errors, wrong, issued = [], 0, 0, 0
    clients = [httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1), timeout=60)
               for _ in range(concurrency)]

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued, errors, wrong
        while issued < requests and time.perf_counter() < deadline:
            index = issued % len(inputs)
            issued += 1
            started = time.perf_counter()
            try:
                response = await client.post("/v1/predict", json={"inputs": [inputs[index]]})
            except httpx.HTTPError:
                errors += 1
                continue
            if response.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            answers = response.json()["predictions"]
            wrong += len(answers) != 1 or not matches(answers[0], expected[index])

    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(*(worker(client) for client in clients))
    elapsed = time.perf_counter() - started
    await asyncio.gather(*(client.aclose() for client in clients))
    ordered = sorted(latencies)
    return {"concurrency": concurrency, "issued": issued, "answered": len(latencies), "errors": errors,
            "lost": issued - len(latencies) - errors, "wrong_answers": wrong, "seconds": elapsed,
            "throughput_rps": len(latencies) / elapsed, "latency_p50_ms": 1000 * statistics.median(ordered),
            "latency_p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def service_side(log: Path, start: int) -> tuple[dict, int]:
    """From the service's log lines after byte offset `start`: the mean micro-batch a request was served
    in and the latency the service measured (queue + engine, without HTTP); and the new offset."""
    data = log.read_bytes()[start:]
    lines = re.findall(r"predict inputs=\d+ batch=(\d+) latency_ms=([\d.]+)", data.decode(errors="replace"))
    sizes, latencies = [int(b) for b, _ in lines], sorted(float(ms) for _, ms in lines)
    if not lines:
        return {}, start + len(data)
    return {"mean_batch_per_request": statistics.mean(sizes), "service_p50_ms": statistics.median(latencies),
            "service_p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}, start + len(data)


def plot(report: dict, path: Path) -> None:
    """Throughput and latency (clients' p50/p99, the service's own p99) against concurrency, per mode."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (mode, rows), color in zip(report["modes"].items(), ("tab:blue", "tab:orange")):
        levels = [r["concurrency"] for r in rows]
        left.plot(levels, [r["throughput_rps"] for r in rows], marker="o", color=color, label=mode)
        right.plot(levels, [r["latency_p50_ms"] for r in rows], marker="o", color=color, label=f"{mode}, p50")
        right.plot(levels, [r["latency_p99_ms"] for r in rows], marker="s", color=color, linestyle="--",
                   label=f"{mode}, p99")
        right.plot(levels, [r.get("service_p99_ms") for r in rows], marker="^", color=color, linestyle=":",
                   label=f"{mode}, p99 inside the service")
    for axis, label in ((left, "requests / s"), (right, "latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    right.set_yscale("log")
    figure.suptitle(f"de3bert serve on 127.0.0.1: {report['checkpoint']} ({report['task']} dev inputs, "
                    f"one input per request)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


MODES = {"micro-batching": True, "one request at a time": False}


@dataclass
class Service:
    """A running `de3bert serve` process, its URL, its log and how far the log has been read."""

    process: subprocess.Popen
    url: str
    log: Path
    offset: int = 0


def summarize(runs: list[dict]) -> dict:
    """One table row from repeated runs of a cell: counts summed, rates and latencies as medians."""
    row = {"concurrency": runs[0]["concurrency"], "repeats": len(runs)}
    for key in ("issued", "answered", "errors", "lost", "wrong_answers"):
        row[key] = sum(run[key] for run in runs)
    for key in ("throughput_rps", "latency_p50_ms", "latency_p99_ms", "mean_batch_per_request", "service_p50_ms",
                "service_p99_ms"):
        values = [run[key] for run in runs if key in run]
        row[key] = statistics.median(values) if values else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default="runs/demo-sst2", help="checkpoint folder to serve")
    parser.add_argument("--requests", type=int, default=300, help="requests per run")
    parser.add_argument("--duration", type=float, default=30.0, help="time limit per run (s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64], help="concurrent clients")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per cell, alternating the modes so that load from other jobs hits both alike")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="the service's micro-batching wait")
    parser.add_argument("--data-dir", help="GLUE folder (default: $GLUE_DIR, else ../shared/data/glue)")
    args = parser.parse_args()
    model = EarlyExitModel.from_pretrained(args.checkpoint)
    task, examples = load_split(model.config.task, "dev", args.data_dir)
    examples = examples[:DISTINCT_INPUTS]
    inputs = [{"text": e.text_a} if e.text_b is None else {"text": e.text_a, "text_pair": e.text_b} for e in examples]
    pairs = [e.text_b for e in examples] if examples[0].text_b is not None else None
    expected = EarlyExitEngine(model).predict([e.text_a for e in examples], pairs)
    report = {"checkpoint": args.checkpoint, "task": task.name, "policy": model.config.policy,
              "requests_per_run": args.requests, "duration_limit_s": args.duration, "repeats": args.repeats,
              "max_wait_ms": args.max_wait_ms, "runs": [], "modes": {}}
    services = {}
    with tempfile.TemporaryDirectory() as scratch:
        try:
            for mode, micro_batching in MODES.items():  # both stay up; an idle one costs no CPU
                port, log = free_port(), Path(scratch) / f"service-{micro_batching}.log"
                service = services[mode] = Service(
                    start_service(args.checkpoint, port, micro_batching, args.max_wait_ms, log),
                    f"http://127.0.0.1:{port}", log)
                asyncio.run(load(service.url, inputs, expected, 1, 8, args.duration))  # warm-up
                service.offset = service_side(log, 0)[1]
            for concurrency in args.concurrency:
                for repeat in range(args.repeats):
                    for mode, service in services.items():
                        run = asyncio.run(load(service.url, inputs, expected, concurrency, args.requests,
                                               args.duration))
                        inside, service.offset = service_side(service.log, service.offset)
                        report["runs"].append({"mode": mode, "repeat": repeat} | run | inside)
                        print(json.dumps(report["runs"][-1]), flush=True)
        finally:
            for service in services.values():
                service.process.terminate()
                service.process.wait(timeout=30)
    for mode in MODES:
        report["modes"][mode] = [summarize([r for r in report["runs"] if r["mode"] == mode and r["concurrency"] == c])
                                 for c in args.concurrency]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "load.json").write_text(json.dumps(report, indent=2))
    plot(report, OUT / "load.png")
    for mode, rows in report["modes"].items():
        for row in rows:
            print(f"{mode:>22}  {row['concurrency']:>3} clients  {row['throughput_rps']:6.1f} req/s  "
                  f"p50 {row['latency_p50_ms']:7.1f} ms  p99 {row['latency_p99_ms']:7.1f} ms  "
                  f"batch {row['mean_batch_per_request']:5.1f}  errors {row['errors']}  lost {row['lost']}  "
                  f"wrong {row['wrong_answers']}")
    print(f"written to {OUT}/load.json and load.png")


if __name__ == "__main__":
    main()
