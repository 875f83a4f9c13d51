"""The harness's summary: one table (markdown) and two plots per grid, throughput vs concurrency and TPOT vs
context, one line per configuration."""

from __future__ import annotations

from pathlib import Path

COLUMNS = (
    ("config", "config"),
    ("input_len", "in"),
    ("output_len", "out"),
    ("concurrency", "conc"),
    ("max_concurrent_requests", "peak in flight"),
    ("output_throughput", "out tok/s"),
    ("total_token_throughput", "total tok/s"),
    ("request_throughput", "req/s"),
    ("median_ttft_ms", "TTFT p50 ms"),
    ("median_tpot_ms", "TPOT p50 ms"),
    ("p99_tpot_ms", "TPOT p99 ms"),
    ("median_itl_ms", "ITL p50 ms"),
    ("median_e2el_ms", "e2e p50 ms"),
    ("kv_usage_peak", "KV peak"),
    ("failed", "failed"),
)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(label for _, label in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(_cell(r.get(key)) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def plot(rows: list[dict], out_dir: Path, label: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    inputs = sorted({r["input_len"] for r in rows})
    paths = []
    fig, axes = plt.subplots(1, len(inputs), figsize=(4.5 * len(inputs), 3.6), squeeze=False)
    for ax, n in zip(axes[0], inputs):
        for config in configs:
            pts = sorted(
                (r["concurrency"], r["output_throughput"]) for r in rows if (r["config"], r["input_len"]) == (config, n)
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=config)
        ax.set(title=f"input {n} tokens", xlabel="max concurrency", ylabel="output tok/s", xscale="log", xticks=[])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Throughput vs concurrency ({label})")
    fig.tight_layout()
    paths.append(out_dir / "throughput_vs_concurrency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for config in configs:
        pts = sorted(
            (r["input_len"], r["median_tpot_ms"]) for r in rows if r["config"] == config and r["concurrency"] == 1
        )
        if pts:
            ax.plot(*zip(*pts), marker="o", label=config)
    ax.set(title=f"TPOT vs context, concurrency 1 ({label})", xlabel="input tokens", ylabel="median TPOT ms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "tpot_vs_context.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
