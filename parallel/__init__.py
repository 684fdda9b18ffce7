"""Context-parallel attention (Ulysses, zigzag ring, all-gather KV, hybrid) for dense and packed sequences."""
