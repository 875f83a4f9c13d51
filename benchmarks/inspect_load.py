"""Does /moa/requests traffic slow decoding? A real moa server (with an API key) decodes a fixed set of streams
while phases rotate between no HTTP traffic ("quiet"), `--rate` GETs per second on /moa/requests ("moa") and the
same rate on vLLM's own /v1/models ("control": what any HTTP traffic of that rate costs on this machine). Per
phase: the median inter-token gap of the streams (= the decode step time: every step gives each running stream one
token), the GETs answered, and for "moa" how many reports the engine made (its own counter, carried in the
snapshot) against the poll interval's expectation. The rotation order alternates between rounds so that drift
cancels.

    python -m benchmarks.inspect_load --out benchmarks/results/inspect/inspect_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from moa_vllm.server_process import free_port, stop, wait_ready

ROOT = Path(__file__).resolve().parents[1]
KEY = "inspect-load-key"


@dataclass
class Phase:
    name: str  # "quiet", "moa" (GETs on /moa/requests) or "control" (GETs on /v1/models)
    start: float
    end: float
    gets_ok: int = 0
    gets_other: int = 0
    reports_first: int | None = None
    reports_last: int | None = None
    ages: list[float] = field(default_factory=list)


def _request(port: int, path: str, body: dict | None = None, timeout: float = 600):
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers), timeout=timeout
    )


def stream_forever(port: int, prompt: str, max_tokens: int, stop_at: float, stamps: list[float]) -> None:
    """Streaming completions back to back until stop_at; the arrival time of every token chunk, a None between
    requests (a gap across requests is no decode step)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    while time.monotonic() < stop_at:
        with _request(port, "/v1/completions", body) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    stamps.append(time.monotonic())
        stamps.append(None)


def decode_gaps(stamps: list[float | None]) -> list[tuple[float, float]]:
    """(end time, gap) between consecutive tokens of one request (the first token ends the prefill; each later
    one a decode step); None separates requests, and no gap spans two."""
    out, prev = [], None
    for t in stamps:
        if t is not None and prev is not None:
            out.append((t, t - prev))
        prev = t
    return out


ROUTES = {"moa": "/moa/requests", "control": "/v1/models"}


def get_load(port: int, rate: float, phase: Phase) -> None:
    """`rate` GETs per second on the phase's route for its window, paced by the clock (not by replies)."""
    n = 0
    while True:
        due = phase.start + n / rate
        if due >= phase.end:
            return
        time.sleep(max(0.0, due - time.monotonic()))
        n += 1
        try:
            with _request(port, ROUTES[phase.name], timeout=10) as r:
                report = json.loads(r.read())
            phase.gets_ok += 1
            if phase.name == "moa":
                phase.reports_first = phase.reports_first or report["engine_reports"]
                phase.reports_last = report["engine_reports"]
                phase.ages.append(report["snapshot_age_s"])
        except OSError:
            phase.gets_other += 1


def summarise(phases: list[Phase], gaps: list[tuple[float, float]], interval_s: float) -> dict:
    rows = []
    for p in phases:
        inside = [g for t, g in gaps if p.start <= t < p.end]
        row = {"phase": p.name, "seconds": round(p.end - p.start, 2), "decode_gaps": len(inside),
               "median_step_ms": round(1000 * statistics.median(inside), 3) if inside else None}  # fmt: skip
        if p.name in ROUTES:
            row |= {"route": ROUTES[p.name], "gets_ok": p.gets_ok, "gets_failed": p.gets_other,
                    "gets_per_s": round(p.gets_ok / (p.end - p.start), 2)}  # fmt: skip
        if p.name == "moa":
            # first to last snapshot seen: the reports the engine made while the GETs ran
            row |= {
                "engine_reports_seen": (p.reports_last - p.reports_first) if p.reports_first is not None else None,
                "expected_reports": round((p.end - p.start) / interval_s, 1),
                "median_snapshot_age_s": round(statistics.median(p.ages), 3) if p.ages else None,
            }
        rows.append(row)

    def pooled(name: str) -> float | None:
        inside = [g for p in phases if p.name == name for t, g in gaps if p.start <= t < p.end]
        return statistics.median(inside) if inside else None

    medians = {name: pooled(name) for name in ("quiet", "moa", "control")}

    def ratio(a: str, b: str) -> float | None:
        return round(medians[a] / medians[b], 4) if medians[a] and medians[b] else None

    return {
        "phases": rows,
        "median_step_ms": {k: round(1000 * v, 3) if v else None for k, v in medians.items()},
        "ratio_moa_vs_quiet": ratio("moa", "quiet"),
        "ratio_control_vs_quiet": ratio("control", "quiet"),
        "ratio_moa_vs_control": ratio("moa", "control"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", default=str(ROOT / "plans/SmolLM2-135M-Instruct/moa-d0.25.json"))
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--rate", type=float, default=20.0, help="GETs per second in a 'gets' phase")
    ap.add_argument("--phase-seconds", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=2, help="rotations of quiet / moa / control")
    ap.add_argument("--max-tokens", type=int, default=64, help="per stream request (short: phases span many)")
    ap.add_argument("--engine-cores", default="all", choices=["all", "one"],
                    help="all: the worker's threads on every core (moa-vllm serve's default); one: core 0 only, "
                         "the API server and this client on the rest")  # fmt: skip
    ap.add_argument("--interval", type=float, default=1.0, help="MOA_VLLM_METRICS_INTERVAL of the server")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    port = free_port()
    log = args.out.with_suffix(".server.log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "moa_vllm.cli", "serve", "--plan", args.plan, "--max-model-len", "4096",
           "--dtype", "float32", "--enforce-eager", "--api-key", KEY, "--served-model-name", "bench",
           "--port", str(port)]  # fmt: skip
    env = os.environ | {"MOA_VLLM_METRICS_INTERVAL": str(args.interval), "VLLM_CPU_KVCACHE_SPACE": "2",
                        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}  # fmt: skip
    if args.engine_cores == "one":
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, port)
        warmup = 10.0
        t0 = time.monotonic() + warmup
        phases, t = [], t0
        for i in range(args.rounds):
            for name in ("quiet", "moa", "control") if i % 2 == 0 else ("control", "moa", "quiet"):
                phases.append(Phase(name, t, t + args.phase_seconds))
                t += args.phase_seconds
        stamps = [[] for _ in range(args.streams)]
        prompt = "The history of the old city begins with a river. " * 8
        workers = [
            threading.Thread(target=stream_forever, args=(port, prompt, args.max_tokens, t + 2, s), daemon=True)
            for s in stamps
        ]
        for w in workers:  # staggered, so that the streams' prefills do not line up
            w.start()
            time.sleep(0.7)
        for p in phases:
            time.sleep(max(0.0, p.start - time.monotonic()))
            if p.name in ROUTES:
                get_load(port, args.rate, p)
            else:
                time.sleep(max(0.0, p.end - time.monotonic()))
        for w in workers:
            w.join(timeout=600)
        gaps = [g for s in stamps for g in decode_gaps(s)]
        result = {
            "command": "python -m benchmarks.inspect_load " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores); float32",
            "plan": Path(args.plan).name,
            "streams": args.streams,
            "get_rate_per_s": args.rate,
            "poll_interval_s": args.interval,
            "engine_cores": args.engine_cores,
            "max_tokens": args.max_tokens,
            **summarise(phases, gaps, args.interval),
        }
    finally:
        stop(proc)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
