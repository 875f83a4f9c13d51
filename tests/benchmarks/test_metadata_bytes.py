"""benchmarks/metadata_bytes.py counts what the real classes allocate: the ring metadata's persistent buffers and
vLLM's block tables, stock (one group) and under moa (one group per layer)."""

from __future__ import annotations

from benchmarks.metadata_bytes import REPO, measure
from moa_vllm.plan.ring import cdiv


def test_bytes_follow_the_buffers_shapes():
    folder = REPO / "plans" / "Llama-3.2-1B-Instruct"
    out = measure(folder, folder / "moa-reference.json", max_model_len=4096, max_num_seqs=4, block_size=16)
    fp = out["fingerprint"]
    layers, heads = fp["num_layers"], fp["num_kv_heads"]
    assert out["stock_vllm_block_tables"]["groups"] == 1
    assert out["stock_vllm_block_tables"]["device"] == 4 * cdiv(4096, 16) * 4
    dense = out["plans"]["dense"]
    pages = dense["ring_metadata_cpu"]["ring_pages_widest_head"]
    assert pages == cdiv(4096, 16)
    # CPU: one page-table scratch [R * H * P] int32 for all layers + spans [L, R, H] int64
    assert dense["ring_metadata_cpu"]["page_table_scratch"] == 4 * heads * pages * 4
    assert dense["ring_metadata_cpu"]["device"] == 4 * heads * pages * 4 + layers * 4 * heads * 8
    # CUDA: the kernels read vLLM's block table, only the spans remain, whatever max_model_len
    assert dense["ring_metadata_cuda"]["page_table_scratch"] == 0
    assert dense["ring_metadata_cuda"]["device"] == layers * 4 * heads * 8
    vllm_moa = dense["vllm_block_tables_moa_config"]
    assert vllm_moa["groups"] == layers and vllm_moa["device"] == layers * out["stock_vllm_block_tables"]["device"]
    reference = out["plans"]["reference"]
    assert reference["vllm_block_tables_moa_config"]["device"] < vllm_moa["device"]  # sparse rings: fewer columns
