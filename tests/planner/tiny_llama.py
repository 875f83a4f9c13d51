"""A tiny random llama (GQA) with a small trained byte-level tokenizer, saved as a HF folder, for planner tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from moa_vllm.data.synthetic_text import SENTENCES
from moa_vllm.planner.calibrate import docs_corpus
from moa_vllm.planner.config import PlannerConfig

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(vocab_size: int, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 8) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=heads * head_dim,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in well under a second on offline text, with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([*SENTENCES, docs_corpus()[:100_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_llama(out: Path, seed: int = 0) -> Path:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tokenizer)))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def planner_config(model: Path, work: Path, **changes) -> PlannerConfig:
    """A planner run on the tiny llama that takes seconds: two profiled lengths, a small grid, short answers."""
    base = dict(
        model=model,
        work_dir=work,
        lengths=(160, 224),
        validation_length=192,
        extension_lengths=(),
        samples_per_length=2,
        validation_samples=2,
        max_new_tokens=6,
        check_answers=False,  # a random model never answers right
        ship_gate=False,
        sinks=8,
        min_span=16,
        alphas=(0.0, 64.0),
        num_betas=5,
        time_limit_s=20.0,
        epsilon_points=3,
        hybrid_heads=(1,),
        fidelity_texts=1,
        fidelity_length=192,
        progress=False,
    )
    return PlannerConfig(**{**base, **changes})
