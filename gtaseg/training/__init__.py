"""The training loop and its parts: epoch end, checkpoint, EMA, losses, mixing, distributed."""
