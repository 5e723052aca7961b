"""The embedded demo's tokenizer and tiny model, built locally (nothing comes from a hub).

- `build_tokenizer`: a byte-level BPE tokenizer trained on the demo texts, saved in Hugging Face
  format with a ChatML chat template (the format Qwen models use), `<think>`/`</think>` as tokens.
- `build_tiny_model`: a randomly initialised Qwen2-architecture causal LM in Hugging Face format.
  Head size 32 (vLLM's CPU attention rejects 16), float32, tied embeddings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

# ChatML as Qwen2 models render it; an optional leading system message, generation prompt on request.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenization (digits one by one). Recent transformers load any tokenizer beside a
# qwen2 config as Qwen2Tokenizer, which applies this pattern whatever tokenizer.json says, so the
# demo tokenizer uses it too: every environment then splits text the same way.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ADDED_TOKENS = ["<think>", "</think>"]


def build_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024) -> int:
    """Train a byte-level BPE tokenizer on `texts` and save it to `out_dir`. Returns its size.

    Deterministic: BPE training counts pairs exactly and breaks ties by pair order, and it runs
    single-threaded here so that merges cannot depend on thread scheduling.
    """
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_tokens(ADDED_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return len(fast)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the demo model (Qwen2 architecture)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4  # head size 32
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def build_tiny_model(
    tokenizer_dir: str | Path, out_dir: str | Path, spec: TinyModelSpec, seed: int,
    vocab_size: int | None = None,
) -> int:  # fmt: skip
    """Initialise a Qwen2 causal LM with the tokenizer's vocabulary (or `vocab_size` rows, e.g. a real
    model's 151 936, for benchmarks) and save it with the tokenizer.

    Returns the number of parameters. The same seed gives byte-identical weights.
    """
    if spec.head_dim not in (32, 64, 80, 96, 112, 128, 256):
        raise ValueError(
            f"head size {spec.head_dim} (hidden_size / num_attention_heads) is not supported by vLLM's "
            "CPU attention; choose 32 or 64"
        )
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = Qwen2Config(
        vocab_size=max(vocab_size or 0, len(tok)),
        **{k: v for k, v in asdict(spec).items() if k != "rope_theta"},
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())
