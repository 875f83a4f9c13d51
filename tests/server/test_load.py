"""The real OpenAI server (moa backend, a MoA plan) under concurrent streaming clients with disconnects: no server
error, every completed greedy output equal to the same request run alone, vLLM's KV usage back to 0 (every block
back in the pool) after each round, resident memory not growing across rounds.

CI runs the short version (8 clients, prompts up to 1k tokens, 2 rounds); `pytest -m slow tests/server` runs the
full one (32 clients, prompts up to 8k, 10% disconnecting, 2 rounds)."""

from __future__ import annotations

import asyncio
import random
import subprocess
from dataclasses import dataclass

import pytest

from moa_vllm.data import natural_prompt
from moa_vllm.server_process import free_port, moa_vllm, stop, tree_rss_bytes, wait_kv_idle, wait_ready
from tests.conftest import PLANS

pytestmark = pytest.mark.server


@dataclass(frozen=True)
class Load:
    clients: int
    max_prompt: int
    max_model_len: int
    rounds: int
    disconnect_every: int  # every k-th client hangs up mid-stream
    max_tokens: int
    kv_gib: int


SHORT = Load(clients=8, max_prompt=1000, max_model_len=2048, rounds=2, disconnect_every=4, max_tokens=24, kv_gib=1)
FULL = Load(clients=32, max_prompt=8000, max_model_len=8192, rounds=2, disconnect_every=10, max_tokens=32, kv_gib=2)


def start_server(model_dir, load: Load, log):
    port = free_port()
    out = open(log, "w")
    proc = moa_vllm(
        "serve", str(model_dir), "--plan", str(PLANS / "moa-d0.25.json"), "--port", str(port),
        "--max-model-len", str(load.max_model_len), "--dtype", "float32", "--served-model-name", "smol",
        "--kv-cache-memory-bytes", str(load.kv_gib * 2**30), "--max-num-seqs", str(load.clients),
        stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_ready(proc, port)
    return proc, port


def prompts_for(tokenizer, load: Load, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    lengths = [rnd.randint(16, load.max_prompt) for _ in range(load.clients)]
    return [natural_prompt(tokenizer, n, seed=seed * 100 + i) for i, n in enumerate(lengths)]


async def one_client(client, prompt: list[int], max_tokens: int, hang_up_after: int | None) -> str | None:
    """Streams a greedy completion; returns its text, or None if this client hung up on purpose."""
    stream = await client.completions.create(
        model="smol", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    text, chunks = [], 0
    async for chunk in stream:
        chunks += 1
        text.append(chunk.choices[0].text if chunk.choices else "")
        if hang_up_after is not None and chunks >= hang_up_after:
            await stream.close()
            return None
    return "".join(text)


async def one_round(port: int, prompts: list[list[int]], load: Load) -> list[str | None]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=1800)
    hang = [3 if (i + 1) % load.disconnect_every == 0 else None for i in range(len(prompts))]
    async with client:
        return await asyncio.gather(*(one_client(client, p, load.max_tokens, h) for p, h in zip(prompts, hang)))


def alone(port: int, prompt: list[int], max_tokens: int) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    out = client.completions.create(
        model="smol", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    return out.choices[0].text


def run_load(model_dir, tokenizer, load: Load, tmp_path) -> dict:
    proc, port = start_server(model_dir, load, tmp_path / "server.log")
    figures = {"served": 0, "hung_up": 0, "errors": 0, "rss": []}
    try:
        for r in range(load.rounds):
            prompts = prompts_for(tokenizer, load, seed=r)
            texts = asyncio.run(one_round(port, prompts, load))
            assert proc.poll() is None, "the server died under load"
            for prompt, text in zip(prompts, texts):
                if text is None:
                    figures["hung_up"] += 1
                    continue
                figures["served"] += 1
                assert text == alone(port, prompt, load.max_tokens), f"round {r}: batched != alone"
            assert wait_kv_idle(port) == 0.0, "KV usage did not come back to 0"
            figures["rss"].append(tree_rss_bytes(proc.pid))
        log = (tmp_path / "server.log").read_text(errors="replace")
        figures["errors"] = sum(" 500 " in line or "Traceback" in line for line in log.splitlines())
    finally:
        stop(proc)
    return figures


def check(figures: dict, load: Load) -> None:
    assert figures["errors"] == 0
    assert figures["hung_up"] == load.rounds * (load.clients // load.disconnect_every)
    assert figures["served"] == load.rounds * load.clients - figures["hung_up"]
    first, last = figures["rss"][0], figures["rss"][-1]
    assert last <= first * 1.05 + 64 * 2**20, f"server memory grew across rounds: {figures['rss']}"


def test_short_load_with_disconnects(model_dir, tokenizer, tmp_path):
    figures = run_load(model_dir, tokenizer, SHORT, tmp_path)
    print("load figures:", figures)  # quoted in notes; visible with -s
    check(figures, SHORT)


@pytest.mark.slow
def test_full_load_with_disconnects(model_dir, tokenizer, tmp_path):
    figures = run_load(model_dir, tokenizer, FULL, tmp_path)
    print("load figures:", figures)
    check(figures, FULL)
