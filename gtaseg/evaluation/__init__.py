"""Evaluation: confusion matrix and IoU, inference modes, the evaluate entry points."""
