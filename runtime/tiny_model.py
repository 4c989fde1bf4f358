"""Generate a tiny Llama-architecture Hugging Face checkpoint, locally and deterministically.

The tokenizer is byte-level (one token per UTF-8 byte, plus <s>, </s>, <unk>), so a prompt's
token count is its byte count: tests and benchmarks can size prompts exactly. Weights are random
with a large init scale so greedy outputs depend on the whole prompt (a wrong KV block changes
the tokens). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# where `disagg` keeps the generated model (XDG cache)
DEFAULT_MODEL_DIR = Path(
    os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
) / "disagg" / "tiny-llama"

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_level_vocab() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    return vocab


def _build_tokenizer(out_dir: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _byte_level_vocab()
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(out_dir)
    return len(vocab)


def make_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 16384,
    initializer_range: float = 0.1,
) -> Path:
    """Write a tiny Llama checkpoint (safetensors, config, tokenizer, chat template) to out_dir.

    The same arguments always give byte-identical weights. Returns the output directory.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = _build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(mean=0.0, std=initializer_range)
    model.save_pretrained(out, safe_serialization=True)
    (out / "disagg_tiny_model.json").write_text(json.dumps({"seed": seed, "generator": "disagg"}))
    return out


def is_tiny_model(path: str | Path) -> bool:
    """True when path holds a checkpoint written by make_tiny_model."""
    return (Path(path) / "disagg_tiny_model.json").exists()
