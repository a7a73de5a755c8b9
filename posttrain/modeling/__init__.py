"""Models: load tokenizers and causal LMs, apply adapters, save, load for inference."""
