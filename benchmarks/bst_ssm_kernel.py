"""S4D convolution kernel: the blocked form `S4D.kernel` uses vs the direct one it replaced, forward + backward.

Usage:
    python -m benchmarks.bst_ssm_kernel [--lengths 1024 8192] [--repeats 7] [--threads 2] [--out FILE]

Shapes are the shipped LM's (hidden 128 channels, S4D state 16); one layer's kernel per call. The direct form is
written out here (one complex exponential per mode, channel and position, then a sum over modes); both are checked
to agree before they are timed. Medians of ``--repeats`` runs after one warm-up, side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from moa_vllm.bst.ssm import S4D

REPO = Path(__file__).resolve().parents[1]


def direct_kernel(ssm: S4D, length: int) -> torch.Tensor:
    """K_l = 2 Re(sum_n C_n dB_n exp(l dt A_n)), one exponential per (channel, mode, position)."""
    disc = ssm.discretize(torch.float32)
    powers = torch.exp(disc.dtA[..., None] * torch.arange(length, dtype=torch.float32).to(disc.dtA.dtype))
    return 2 * torch.einsum("hn,hnl->hl", disc.C * disc.dB, powers).real


def time_backward(fn, repeats: int) -> float:
    """Median seconds of fn() followed by a backward pass through its sum."""
    fn().sum().backward()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--state-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bst_ssm_kernel.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ssm = S4D(args.channels, args.state_size, "lin", 1e-4, 1e-1)
    rows = []
    for length in args.lengths:
        with torch.no_grad():
            diff = (ssm.kernel(length) - direct_kernel(ssm, length)).abs().max().item()
        direct = time_backward(partial(direct_kernel, ssm, length), args.repeats)
        blocked = time_backward(partial(ssm.kernel, length), args.repeats)
        rows.append({"length": length, "direct_s": direct, "blocked_s": blocked, "speedup": direct / blocked,
                     "max_abs_difference": diff})  # fmt: skip
        print(f"L={length}: direct {direct * 1e3:.1f} ms, blocked {blocked * 1e3:.1f} ms, "
              f"x{direct / blocked:.1f}, max |diff| {diff:.1e}")  # fmt: skip
    report = {
        "command": shlex.join(["python", "-m", "benchmarks.bst_ssm_kernel", *sys.argv[1:]]),
        "device": f"CPU ({os.cpu_count()} cores, {args.threads} threads), float32, forward + backward",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "channels": args.channels,
        "state_size": args.state_size,
        "repeats": args.repeats,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
