"""Shipping a trained model: merge (adapters into bases, fine-tunes with each other), export, serve."""
