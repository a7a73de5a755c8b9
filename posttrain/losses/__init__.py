"""Losses as small pure functions of (model, batch) or of log-probabilities."""
