"""The network: the smp build, the original's decoder, encoder weights."""
