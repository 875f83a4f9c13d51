"""The serving harness's arithmetic and report without a server: bytes per request (dense vs a plan), the sweep up
to each configuration's own maximum, vLLM's capacity line parsed from a log, the summary table."""

from __future__ import annotations

import pytest

from benchmarks.serve import capacity, report
from benchmarks.serve.harness import cache_bytes, configs
from benchmarks.serve.server import Config, Server, server_cmd, server_env
from tests.conftest import PLANS


@pytest.mark.model
def test_a_quarter_density_plan_fits_about_four_times_the_requests(model_dir):
    per_token, layer_heads = capacity.token_bytes(str(model_dir), 4)
    assert (per_token, layer_heads) == (2 * 64 * 4, 30 * 3)
    budget = 16 * 2**30  # large enough that whole requests do not blur the ratio
    dense = capacity.max_requests(budget, None, 8192, per_token, layer_heads, 32)
    sparse = capacity.max_requests(budget, str(PLANS / "uniform-d0.25.json"), 8192, per_token, layer_heads, 32)
    assert dense == budget // (8192 * per_token * layer_heads)
    assert 3.5 * dense <= sparse <= 4.5 * dense


def test_sweep_reaches_each_maximum():
    assert capacity.sweep(1) == [1]
    assert capacity.sweep(6) == [1, 2, 4, 6]
    assert capacity.sweep(8) == [1, 2, 4, 8]
    assert capacity.sweep(5, [1, 3, 16]) == [1, 3, 5]


def test_capacity_is_read_from_the_server_log(tmp_path):
    log = tmp_path / "s.log"
    log.write_text(
        "INFO ... CPU KV cache size: 21,760 tokens, Maximum concurrency for 8,448 tokens per request: 2.58x\n"
    )
    assert Server(None, 0, log).capacity() == {
        "kv_cache_tokens": 21760,
        "reported_max_concurrency": 2.58,
        "at_tokens_per_request": 8448,
    }


def test_servers_are_loopback_with_the_pinned_budget(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    cmd = server_cmd("/m", Config("moa", "p.json"), 8123, 123456, 2048, "float32")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == "123456"
    assert cmd[cmd.index("--plan") + 1] == "p.json"
    assert "VLLM_CPU_KVCACHE_SPACE" not in server_env()  # it would override the flag
    stock = server_cmd("/m", Config("stock", None), 8123, 1, 2048, "float32")
    assert "--plan" not in stock and "vllm.entrypoints.openai.api_server" in stock


def test_stock_fp8_is_a_baseline_row_with_one_byte_per_value():
    chosen = configs(["plans/x/moa-d0.25.json"], stock=True, stock_fp8=True, kv_cache_dtype="fp8")
    assert [c.name for c in chosen] == ["stock-dense", "stock-dense-fp8", "moa-d0.25-fp8"]
    assert [cache_bytes(c, "float32") for c in chosen] == [4, 1, 1]
    cmd = server_cmd("/m", chosen[1], 8123, 1, 2048, "float32")
    assert cmd[cmd.index("--kv-cache-dtype") + 1] == "fp8" and "--plan" not in cmd
    plain = server_cmd("/m", configs([], stock=True)[0], 8123, 1, 2048, "float32")
    assert plain[plain.index("--kv-cache-dtype") + 1] == "auto"


def test_table_has_a_row_per_run():
    rows = [{"config": "a", "input_len": 1024, "output_len": 64, "concurrency": 1, "output_throughput": 12.5}]
    lines = report.table(rows).splitlines()
    assert len(lines) == 3 and "| a | 1024 | 64 | 1 |" in lines[2]
