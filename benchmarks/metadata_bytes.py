"""Bytes of the per-request metadata a served model carries: moa-vllm's ring metadata (RingState's persistent
buffers, as the worker allocates them on CUDA, where the kernels read vLLM's block table and no page-table scratch
exists, and on CPU, where CPU_ATTN reads page tables from one shared scratch) against vLLM's own block tables
(vLLM's MultiGroupBlockTable, built as the GPU model runner builds it: one group for stock vLLM, and one group for
all MoA layers with the ring spec's width: the rings of every layer, then, with prefix caching on (vLLM's default),
one prefix column per block of max_model_len).

Both are the real classes, allocated on PyTorch's meta device where they would live on the GPU (no memory is
taken; nbytes is exact); vLLM's host-side mirrors are real CPU tensors and are counted separately.

Usage:
  python benchmarks/metadata_bytes.py [--model-dir plans/Llama-3-8B-Instruct-262k] [--max-model-len 131072]
      [--max-num-seqs 256] [--block-size 16]
Result: benchmarks/results/metadata_bytes.json, with its command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODELS = ["Llama-3.2-1B-Instruct", "Llama-3-8B-Instruct-262k"]


def ring_metadata_bytes(
    plan, max_model_len: int, max_num_seqs: int, block_size: int, page_tables: bool
) -> dict[str, int]:
    """page_tables: CPU (CPU_ATTN reads page tables from the shared scratch) or CUDA (the Triton kernels read vLLM's
    block table: no scratch)."""
    from moa_vllm.vllm_plugin.moa.ring_state import RingState

    alphas = torch.tensor([[r.alpha for r in layer] for layer in plan.rules], dtype=torch.float64)
    betas = torch.tensor([[r.beta for r in layer] for layer in plan.rules], dtype=torch.float64)
    state = RingState(
        alphas,
        betas,
        plan.min_span,
        plan.sink_tokens,
        block_size,
        max_model_len,
        torch.device("meta"),
        max_num_seqs,
        page_tables=page_tables,
    )
    return {
        "device": state.buffers.nbytes,
        "spans": state.buffers.spans.nbytes,
        "page_table_scratch": state.buffers.tables.nbytes,
        "ring_pages_widest_head": state.max_pages,
    }


def block_table_bytes(widths: list[int], max_num_seqs: int, block_size: int) -> dict[str, int]:
    """vLLM's MultiGroupBlockTable for these per-group widths (max_num_blocks_per_req of each group's spec)."""
    from vllm.v1.worker.block_table import MultiGroupBlockTable

    tables = MultiGroupBlockTable(
        max_num_reqs=max_num_seqs,
        max_num_batched_tokens=2048,
        pin_memory=False,
        device=torch.device("meta"),
        block_sizes=[block_size] * len(widths),
        max_num_blocks=widths,
    )
    groups = tables.block_tables
    return {
        "groups": len(groups),
        "widths": sorted({g.max_num_blocks_per_req for g in groups}),
        "device": sum(g.block_table.gpu.nbytes for g in groups),
        "host": sum(g.block_table.cpu.nbytes for g in groups),
    }


def split_kv_bytes(group: int, head_dim: int, rows: int) -> int:
    """The CUDA decode's split-KV scratch (CudaRingKernels.allocate, moa_kernels.split_scratch on the meta device):
    a fixed softmax scratch for at most SPLIT_KV_MAX_RINGS rings, not per-request metadata; reported beside it."""
    from moa_kernels.ring_decode import split_scratch
    from moa_vllm.vllm_plugin.moa.kernels_cuda import NUM_SEGMENTS, SPLIT_KV_MAX_RINGS

    rings = min(SPLIT_KV_MAX_RINGS, rows)  # rows: the kernels' max_rows, max_num_seqs x KV heads
    return sum(t.nbytes for t in split_scratch(rings, NUM_SEGMENTS, group, head_dim, torch.device("meta")))


def measure(model_dir: Path, plan_path: Path, max_model_len: int, max_num_seqs: int, block_size: int) -> dict:
    from moa_vllm.plan import dense_plan, fingerprint_from_hf_config, load_hf_config, load_plan
    from moa_vllm.vllm_plugin.moa.kv_spec import MoARingSpec

    fp = fingerprint_from_hf_config(load_hf_config(model_dir))
    out = {"model": model_dir.name, "fingerprint": fp.model_dump(), "plans": {}}
    stock = block_table_bytes([-(-max_model_len // block_size)], max_num_seqs, block_size)
    out["stock_vllm_block_tables"] = stock
    out["cuda_split_kv_scratch"] = split_kv_bytes(
        fp.num_query_heads // fp.num_kv_heads, fp.head_dim, max_num_seqs * fp.num_kv_heads
    )
    for name, plan in (("reference", load_plan(plan_path)), ("dense", dense_plan(fp))):
        tables = {}
        for caching in (True, False):
            spec = MoARingSpec(
                block_size=block_size,
                num_kv_heads=fp.num_kv_heads,
                head_size=fp.head_dim,
                dtype=torch.bfloat16,
                sink_tokens=plan.sink_tokens,
                min_span=plan.min_span,
                alphas=tuple(tuple(r.alpha for r in rules) for rules in plan.rules),
                betas=tuple(tuple(r.beta for r in rules) for rules in plan.rules),
                prefix_blocks=caching,
            )
            tables[caching] = block_table_bytes([spec.max_num_blocks_per_req(None, max_model_len)], max_num_seqs,
                                                block_size)  # fmt: skip
            tables[caching]["ring_columns"] = spec.blocks_for_length(max_model_len)
        vllm_moa = tables[True]
        row = {
            "plan": str(plan_path.relative_to(REPO)) if name == "reference" else "dense (generated)",
            "vllm_block_tables_moa_config": vllm_moa,  # prefix caching on, vLLM's default
            "vllm_block_tables_moa_no_prefix_caching": tables[False],
            "vllm_moa_over_stock_device": vllm_moa["device"] / stock["device"],
            "vllm_moa_no_prefix_caching_over_stock_device": tables[False]["device"] / stock["device"],
        }
        for device, tables in (("cuda", False), ("cpu", True)):
            ring = ring_metadata_bytes(plan, max_model_len, max_num_seqs, block_size, tables)
            row[f"ring_metadata_{device}"] = ring
            row[f"ring_over_vllm_moa_device_{device}"] = ring["device"] / vllm_moa["device"]
            row[f"ring_over_stock_device_{device}"] = ring["device"] / stock["device"]
        out["plans"][name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, help="folders under plans/ with config.json + moa-reference")
    p.add_argument("--max-model-len", type=int, default=131072)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16, help="vLLM's default on CUDA")
    p.add_argument("--out", type=Path, default=RESULTS / "metadata_bytes.json")
    a = p.parse_args(argv)
    rows = []
    for name in a.models:
        folder = REPO / "plans" / name
        rows.append(measure(folder, folder / "moa-reference.json", a.max_model_len, a.max_num_seqs, a.block_size))
    doc = {
        "command": "python benchmarks/metadata_bytes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "max_model_len": a.max_model_len,
        "max_num_seqs": a.max_num_seqs,
        "block_size": a.block_size,
        "note": "device bytes; vLLM also mirrors each block table on the host (host)",
        "results": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    for r in rows:
        print(
            f"{r['model']}: stock vLLM block tables {r['stock_vllm_block_tables']['device'] / 2**20:.1f} MiB; CUDA "
            f"split-KV scratch (fixed, beside the metadata) {r['cuda_split_kv_scratch'] / 2**20:.2f} MiB"
        )
        for name, x in r["plans"].items():
            print(
                f"  {name}: vLLM block tables (moa, {x['vllm_block_tables_moa_config']['groups']} group) "
                f"{x['vllm_block_tables_moa_config']['device'] / 2**20:.1f} MiB = "
                f"{x['vllm_moa_over_stock_device']:.2f}x "
                f"stock with prefix caching, {x['vllm_block_tables_moa_no_prefix_caching']['device'] / 2**20:.1f} MiB "
                f"= {x['vllm_moa_no_prefix_caching_over_stock_device']:.2f}x without; ring metadata "
                + "; ".join(
                    f"{d} {x[f'ring_metadata_{d}']['device'] / 2**20:.2f} MiB = "
                    f"{x[f'ring_over_vllm_moa_device_{d}']:.3f}x / {x[f'ring_over_stock_device_{d}']:.3f}x stock"
                    for d in ("cuda", "cpu")
                )
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
