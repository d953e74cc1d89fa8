"""Training: distillation config, loop, resumable checkpoints, top-k teacher cache, DDP, losses, models."""
