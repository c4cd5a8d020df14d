"""Tiny random models for tests, built from configs like the presets.

``initializer_range=0.2`` (10x the default) so attention is far from uniform: a wrong mask or a
wrong RoPE then changes the logits by far more than any tolerance used here (DESIGN section 3).
"""

from paradec.models import build_model


def tiny_model(arch="qwen3", attn="sdpa", pair_indices=(), vocab=61, layers=2, seed=0,
               init=0.2, branch_stride=128, **extra):
    cfg = dict(name="test", arch=arch, pair_indices=list(pair_indices), branch_stride=branch_stride,
               attn_implementation=attn, dtype="float32", vocab_size=vocab, hidden_size=64,
               num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
               rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True,
               initializer_range=init, seed=seed, **extra)
    model, _ = build_model(cfg)
    return model.eval()
