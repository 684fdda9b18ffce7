"""Model shapes the benchmarks sweep over, taken from the models' published configs.

`MODELS[name]` gives hidden size, intermediate size, query / KV heads, head dim and vocab. `QUICK` (set by
BENCH_QUICK=1) keeps one model and one token count per benchmark so a run finishes in a minute or two.
"""
import os

MODELS = {
    "qwen2.5-0.5b": dict(hidden=896, intermediate=4864, heads=14, kv_heads=2, head_dim=64, vocab=151936),
    "qwen2.5-1.5b": dict(hidden=1536, intermediate=8960, heads=12, kv_heads=2, head_dim=128, vocab=151936),
    "qwen2.5-7b": dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, vocab=152064),
    "qwen2.5-32b": dict(hidden=5120, intermediate=27648, heads=40, kv_heads=8, head_dim=128, vocab=152064),
    "llama-3-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256),
    "siglip-so400m": dict(hidden=1152, intermediate=4304, heads=16, kv_heads=16, head_dim=72, vocab=None),
}

QUICK = os.environ.get("BENCH_QUICK", "0") == "1"


def models(*names):
    """The named models' shapes, or only the first of them in quick mode."""
    chosen = names[:1] if QUICK else names
    return [(name, MODELS[name]) for name in chosen]


def token_counts(*counts):
    """Token counts for a sweep, or only the first in quick mode."""
    return list(counts[:1] if QUICK else counts)
