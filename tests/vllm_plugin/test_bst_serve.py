"""`moa-vllm serve` with a BST checkpoint: no plan needed, token-id prompts (argument handling; no server started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moa_vllm import cli, serve
from moa_vllm.bst import BSTConfig, BSTForCausalLM
from moa_vllm.vllm_plugin.bst.serve import bst_server_argv, is_bst_folder


@pytest.fixture
def bst_folder(tmp_path: Path) -> Path:
    return BSTForCausalLM(BSTConfig(vocab_size=10, hidden_size=16, num_attention_heads=2)).save_pretrained(tmp_path)


@pytest.fixture
def captured(monkeypatch):
    calls = {}
    monkeypatch.setattr(serve.os, "execve", lambda path, argv, env: calls.update(argv=argv, env=env))
    return calls


def test_bst_folder_is_recognised(bst_folder: Path, tmp_path: Path) -> None:
    assert is_bst_folder(str(bst_folder))
    assert not is_bst_folder(str(tmp_path / "missing")) and not is_bst_folder(None)


def test_serve_bst_needs_no_plan_and_skips_the_tokenizer(bst_folder: Path, captured) -> None:
    cli.main(["serve", str(bst_folder), "--port", "8123"])
    argv = captured["argv"]
    assert argv[argv.index("--model") + 1] == str(bst_folder)
    assert "--attention-backend" not in argv and "--additional-config" not in argv
    assert "--skip-tokenizer-init" in argv and "--no-enable-prefix-caching" in argv
    assert argv[argv.index("--dtype") + 1] == "float32" and argv[argv.index("--port") + 1] == "8123"


def test_user_flags_win_over_bst_defaults(bst_folder: Path) -> None:
    argv = bst_server_argv(str(bst_folder), ["--dtype", "bfloat16", "--host", "0.0.0.0"])
    assert argv.count("--dtype") == 1 and argv[argv.index("--dtype") + 1] == "bfloat16"
    assert argv.count("--host") == 1


def test_other_models_still_need_a_plan(tmp_path: Path, captured, capsys) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "pass --plan PLAN, or attach one" in err  # no plan flag, none in the folder
    assert not captured


@pytest.mark.server
def test_served_checkpoint_answers_token_id_prompts_like_the_reference(tmp_path: Path) -> None:
    """The real server (`moa-vllm serve BST_FOLDER`): a token-id completion equals the reference greedy decode."""
    import json
    import urllib.request

    import torch

    from moa_vllm.server_process import serving

    torch.manual_seed(0)
    config = BSTConfig(vocab_size=40, hidden_size=64, num_attention_heads=2, sliding_window=16, initializer_range=0.2)
    model = BSTForCausalLM(config).eval()
    folder = model.save_pretrained(tmp_path / "bst")
    prompt = torch.randint(0, 40, (90,), generator=torch.Generator().manual_seed(3))
    expected = model.generate_greedy(prompt, 8)[90:].tolist()
    args = ["serve", str(folder), "--max-model-len", "512", "--enforce-eager"]
    with serving(args, tmp_path / "server.log") as port:
        body = {"model": str(folder), "prompt": prompt.tolist(), "max_tokens": 8, "temperature": 0,
                "return_token_ids": True}  # fmt: skip
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            choice = json.loads(r.read())["choices"][0]
    assert choice["token_ids"] == expected


LM_CHECKPOINT = Path(__file__).resolve().parents[2] / "benchmarks" / "checkpoints" / "bst-lm"


@pytest.mark.server
def test_served_language_model_completes_text_like_the_reference(tmp_path: Path) -> None:
    """The shipped BST LM behind `moa-vllm serve DIR` (its tokenizer in the folder): text prompts through the OpenAI
    client; greedy completions equal the reference decode of the same token ids."""
    import torch
    from openai import OpenAI

    from moa_vllm.bst.tokenizer import load_tokenizer
    from moa_vllm.server_process import serving

    tok = load_tokenizer(LM_CHECKPOINT)
    model = BSTForCausalLM.from_pretrained(LM_CHECKPOINT, dtype=torch.float32)
    prompts = [
        "import os\nimport sys\n\n\ndef main(argv):\n    ",
        'class Stack:\n    """A LIFO stack."""\n\n    def __init__(self):\n        self.items = []\n\n'
        "    def push(self, ",
    ]
    args = ["serve", str(LM_CHECKPOINT), "--max-model-len", "1024", "--enforce-eager"]
    with serving(args, tmp_path / "server.log") as port:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        for prompt in prompts:
            ids = torch.tensor(tok.encode(prompt).ids)
            expected = model.generate_greedy(ids, 24)[ids.numel() :].tolist()
            out = client.completions.create(
                model=str(LM_CHECKPOINT), prompt=prompt, max_tokens=24, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )  # fmt: skip
            choice = out.choices[0]
            assert choice.token_ids == expected  # type: ignore[attr-defined]
            assert choice.text == tok.decode(expected) and choice.text.strip()
