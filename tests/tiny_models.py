"""Tiny random Hugging Face causal LMs of every family PrunePath supports (no downloads)."""

import torch

VOCAB = 96
HIDDEN = 32
FFN = 64
LAYERS = 2

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2",
            "opt", "gpt_neox")


def tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                  num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8)
    if family == "gemma":
        return tf.GemmaConfig(**common, head_dim=8)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=16)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS,
                             n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    if family == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN,
                            num_hidden_layers=LAYERS, num_attention_heads=4,
                            word_embed_proj_dim=HIDDEN, max_position_embeddings=128,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                num_hidden_layers=LAYERS, num_attention_heads=4,
                                max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    """A tiny random model in eval mode, fp32, with weights scaled up so FFNs matter."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    with torch.no_grad():  # larger weights than the 0.02-std init: non-trivial outputs
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


def random_ids(n: int, s: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, s), generator=g)
