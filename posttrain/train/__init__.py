"""Training: the one loop, checkpoints, distributed plumbing, tracking, and the methods."""
