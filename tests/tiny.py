"""A tiny random-weight Llama: the fast lane's model. It has the real tokenizer and chat
template beside it, so prompts, token counts and limits are the real ones; only the
weights (and so the words it answers) are random."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True, initializer_range=0.1)  # wide enough to say varied things
TINY_NAME = "tiny-llama"  # the folder's name: what the daemon serves it as


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random Llama small enough to build in milliseconds; float32, eval mode."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
