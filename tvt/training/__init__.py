"""Training stages and the shared training engine (accelerate, checkpoints, tracking)."""
