"""Tiny random-weight models for fast tests: several architectures, a byte-level tokenizer.

The weights are drawn from a fixed seed, so every process that builds `tiny:llama` gets the same
model (tests compare the engine against transformers `generate` on the very same weights).
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
VOCAB_SIZE = 257  # 256 bytes + <|endoftext|>

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    bos_token_id=256,
    eos_token_id=256,
    pad_token_id=256,
    initializer_range=0.2,  # peaked logits: greedy comparisons are not decided by rounding
    tie_word_embeddings=False,
)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3", "head_dim": 16},
    "mistral": {"model_type": "mistral", "sliding_window": 64},
    "gemma": {"model_type": "gemma", "head_dim": 16},
    # Mixture-of-Experts: 8 experts, top-2, every layer sparse (expert offload tests).
    "mixtral": {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2,
                "intermediate_size": 32},
    "qwen2_moe": {"model_type": "qwen2_moe", "num_experts": 8, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64},
    "qwen3_moe": {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "head_dim": 16, "norm_topk_prob": True},
    "olmoe": {"model_type": "olmoe", "num_experts": 8, "num_experts_per_tok": 2,
              "intermediate_size": 32},
}
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_config(arch: str):
    extra = dict(TINY_CONFIGS[arch])
    model_type = extra.pop("model_type")
    return AutoConfig.for_model(model_type, **{**_COMMON, **extra})


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    config = tiny_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: every byte is a token, so any text round-trips."""
    vocab = {ch: b for b, ch in enumerate(_bytes_to_unicode())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS)
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return fast


def _bytes_to_unicode() -> list[str]:
    # GPT-2's printable mapping of the 256 byte values, in byte order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    mapping = dict(zip(bs, cs, strict=True))
    return [chr(mapping[b]) for b in range(256)]
