"""BST language model vs its windowed-attention baseline on held-out stdlib source, and the LM served by vLLM.

Usage:
    python -m benchmarks.bst_lm [--bst DIR] [--baseline DIR] [--length 8192] [--out FILE] [--skip-serve]

Perplexity: every held-out file (split by file, see moa_vllm/bst/corpus.py) with at least --length tokens, scored
from its first token in one forward, so the loss at position p has exactly p tokens of context; mean NLL per
context bucket (0,1k], (1k,2k], (2k,4k], (4k,8k] for both models, per-document figures for a paired comparison, and
a plot (NLL by context length, log-spaced bins).

Serving (vllm.LLM, CPU wheel, in-process engine): text prompts cut from held-out files; the served greedy tokens vs
the reference decode (``BSTForCausalLM.generate_greedy`` on the same token ids); and what one request holds in
vLLM's cache during decode at 1k and 8k prompt tokens, next to a dense-attention Llama of the same size (hidden,
layers, heads, vocabulary; random weights: memory does not depend on them) served by stock vLLM.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: its cache manager is readable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

import torch  # noqa: E402

from moa_vllm.bst.lm_eval import DEFAULT_EDGES, bucket_perplexity, position_nll  # noqa: E402
from moa_vllm.bst.model import BSTForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DECODE_TOKENS = 16
SERVE_PROMPT_TOKENS = 1024
SERVE_PROMPTS = 4
SERVE_NEW_TOKENS = 32


def heldout_docs(folder: Path, length: int) -> list[tuple[str, torch.Tensor]]:
    """Held-out documents tokenized with the checkpoint's tokenizer; refuses a corpus other than the trained one."""
    from moa_vllm.bst.corpus import corpus_digest, source_files, split_files
    from moa_vllm.bst.lm_data import encode_files, long_documents
    from moa_vllm.bst.tokenizer import load_tokenizer

    _, heldout = split_files(source_files())
    expected = json.loads((folder / "metrics.json").read_text())["corpus"]["heldout_digest"]
    if corpus_digest(heldout) != expected:
        raise SystemExit(f"{folder}: held-out corpus digest differs from the one trained against (another Python?)")
    encoded = encode_files(load_tokenizer(folder), heldout)
    return long_documents({f.relpath: ids for f, ids in zip(heldout, encoded)}, length)


def perplexity(folder: Path, docs: list[tuple[str, torch.Tensor]], edges: tuple[int, ...]) -> tuple[dict, torch.Tensor]:
    model = BSTForCausalLM.from_pretrained(folder, dtype=torch.float32)
    start = time.perf_counter()
    nll = position_nll(model, [ids for _, ids in docs])
    per_doc = {name: [r["nll"] for r in bucket_perplexity(nll[i : i + 1], edges)] for i, (name, _) in enumerate(docs)}
    return {
        "buckets": bucket_perplexity(nll, edges),
        "per_document_bucket_nll": per_doc,
        "eval_s": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": {
            k: json.loads((folder / "metrics.json").read_text()).get(k)
            for k in ("train_wall_s", "steps", "tokens_seen", "command", "mean_loss_last_50")
        },
    }, nll


def log_bins(nll: torch.Tensor) -> list[dict]:
    """Mean NLL in context-length bins [2^k, 2^(k+1)) across documents (for the plot)."""
    context = torch.arange(1, nll.shape[1] + 1)
    out, lo = [], 1
    while lo <= nll.shape[1]:
        cols = (context >= lo) & (context < 2 * lo)
        out.append({"context_from": lo, "context_to": 2 * lo - 1, "nll": nll[:, cols].mean().item()})
        lo *= 2
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in (("bst", "BST (SSM + window)"), ("baseline", "window only")):
        bins = report["results"][name]["log_bins"]
        left.plot([b["context_from"] for b in bins], [b["nll"] for b in bins], marker="o", label=label)
        buckets = report["results"][name]["buckets"]
        right.plot([f"{b['context_from']}-{b['context_to']}" for b in buckets], [b["ppl"] for b in buckets],
                   marker="o", label=label)  # fmt: skip
    window = report["window"]
    left.axvline(window, color="grey", ls=":", label=f"attention window {window}")
    left.set(xscale="log", xlabel="context length (tokens)", ylabel="held-out NLL (nats)", title="NLL by context")
    right.set(xlabel="context bucket (tokens)", ylabel="perplexity", title="perplexity by context bucket")
    left.legend(), right.legend()
    fig.suptitle(f"held-out stdlib files ({report['documents']} x {report['length']} tokens), CPU float32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def dense_twin(bst_folder: Path, out: Path) -> Path:
    """A Llama with the BST's hidden size, layers, heads and vocabulary (random weights), and its tokenizer."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((bst_folder / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=4 * cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_attention_heads"], max_position_embeddings=16384, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bst_folder / name, out / name)
    return out


def make_llm(folder: Path, max_len: int):
    from vllm import LLM

    return LLM(model=str(folder), dtype="float32", enforce_eager=True, enable_prefix_caching=False,
               max_model_len=max_len, max_num_batched_tokens=512, max_num_seqs=8, seed=0)  # fmt: skip


def close(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def decode_memory(llm, prompt: list[int]) -> dict:
    from benchmarks.bst_recall import holding_trace

    steps = holding_trace(llm, prompt)
    decode = [s["groups"] for s in steps if s["decode"]]
    return {
        "prompt_tokens": len(prompt),
        "decode_groups": decode[-1],
        "decode_bytes_allocated_max": max(sum(g["bytes_allocated"] for g in s) for s in decode),
        "decode_bytes_content_max": max(sum(g["bytes_content"] for g in s) for s in decode),
    }


def serve(folder: Path, docs: list[tuple[str, torch.Tensor]], lengths: list[int], work: Path) -> dict:
    from vllm import SamplingParams

    from moa_vllm.bst.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    model = BSTForCausalLM.from_pretrained(folder, dtype=torch.float32)
    texts = [tok.decode(ids[:SERVE_PROMPT_TOKENS].tolist()) for _, ids in docs[:SERVE_PROMPTS]]
    llm = make_llm(folder, max(lengths) + 2 * DECODE_TOKENS)
    params = SamplingParams(max_tokens=SERVE_NEW_TOKENS, temperature=0, ignore_eos=True)
    outs = llm.generate(texts, params, use_tqdm=False)
    cases = []
    for text, out in zip(texts, outs):
        ids = torch.tensor(tok.encode(text).ids)
        reference = model.generate_greedy(ids, SERVE_NEW_TOKENS)[ids.numel() :].tolist()
        served = list(out.outputs[0].token_ids)
        cases.append({"prompt_tokens": ids.numel(), "served_equals_reference": served == reference,
                      "completion": out.outputs[0].text[:200]})  # fmt: skip
    bst_memory = {str(n): decode_memory(llm, docs[0][1][:n].tolist()) for n in lengths}
    close(llm)
    twin = dense_twin(folder, work / "dense-twin")
    llm = make_llm(twin, max(lengths) + 2 * DECODE_TOKENS)
    dense_memory = {str(n): decode_memory(llm, docs[0][1][:n].tolist()) for n in lengths}
    close(llm)
    return {"greedy": cases, "memory_per_request": {"bst": bst_memory, "dense_llama_same_size": dense_memory}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bst", type=Path, default=REPO / "benchmarks" / "checkpoints" / "bst-lm")
    parser.add_argument("--baseline", type=Path, default=REPO / "benchmarks" / "checkpoints" / "bst-lm-no-ssm")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bst-lm-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bst_lm.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    docs = heldout_docs(args.bst, args.length)
    edges = tuple(e for e in DEFAULT_EDGES if e < args.length) + (args.length,)
    results = {}
    for name, folder in (("bst", args.bst), ("baseline", args.baseline)):
        result, nll = perplexity(folder, docs, edges)
        results[name] = {**result, "checkpoint": str(folder), "log_bins": log_bins(nll)}
    bst_b, base_b = results["bst"]["buckets"], results["baseline"]["buckets"]
    gaps = [{"context_to": b["context_to"], "nll_gap": a["nll"] - b["nll"], "ppl_ratio": a["ppl"] / b["ppl"]}
            for a, b in zip(base_b, bst_b)]  # fmt: skip
    report = {
        "command": shlex.join(["python", "-m", "benchmarks.bst_lm", *sys.argv[1:]]),
        "device": f"CPU ({os.cpu_count()} cores), float32",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "length": args.length,
        "edges": list(edges),
        "documents": len(docs),
        "document_names": [name for name, _ in docs],
        "window": json.loads((args.bst / "config.json").read_text())["sliding_window"],
        "results": results,
        "baseline_minus_bst": gaps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(report, args.out.with_suffix(".png"))
    if not args.skip_serve:
        args.work.mkdir(parents=True, exist_ok=True)
        report["serving"] = serve(args.bst, docs, args.memory_lengths, args.work)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for a, b in zip(bst_b, base_b):
        print(f"({a['context_from']}, {a['context_to']}]: BST ppl {a['ppl']:.3f}  baseline {b['ppl']:.3f}")
    if "serving" in report:
        s = report["serving"]
        print("greedy equal:", [c["served_equals_reference"] for c in s["greedy"]])
        for name, mem in s["memory_per_request"].items():
            print(name, {n: m["decode_bytes_allocated_max"] for n, m in mem.items()})


if __name__ == "__main__":
    main()
