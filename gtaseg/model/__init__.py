"""The network: the smp build, the original's decoder and ResNet-101 encoder, U2PL's auxiliary
head, encoder weights."""
