"""interpkv: position-correct KV caches for TransformerLens."""
