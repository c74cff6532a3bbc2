"""Benchmarks of the training step and loop: step, loop, variants, probes, report."""
