"""The network: the smp build, the original's decoder and ResNet-101 encoder, encoder weights."""
