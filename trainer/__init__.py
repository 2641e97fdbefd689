"""mm-trainer: PyTorch datasets over the ring and the disk cache, the training loop and its daemon."""
