"""The training loop and its parts: epoch end, checkpoint, EMA, losses (the pseudo-label loss; CE
or OHEM on labelled pixels), the global batch, mixing, distributed."""
