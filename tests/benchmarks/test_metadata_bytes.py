"""benchmarks/metadata_bytes.py counts what the real classes allocate: the ring metadata's persistent buffers and
vLLM's block tables, stock (one group) and under moa (one group for all MoA layers)."""

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
    # one group: a dense plan's rings of every layer take stock's columns (a block = one page of each layer), and
    # prefix caching adds one column per block of max_model_len
    vllm_moa, no_caching = dense["vllm_block_tables_moa_config"], dense["vllm_block_tables_moa_no_prefix_caching"]
    assert vllm_moa["groups"] == 1 and no_caching["device"] == out["stock_vllm_block_tables"]["device"]
    assert vllm_moa["device"] == 2 * out["stock_vllm_block_tables"]["device"]
    reference = out["plans"]["reference"]
    assert reference["vllm_block_tables_moa_config"]["device"] < vllm_moa["device"]  # sparse rings: fewer columns
    assert reference["vllm_moa_over_stock_device"] <= 4
