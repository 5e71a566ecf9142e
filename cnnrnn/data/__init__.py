"""Fashion-MNIST items and composites of them, as uint8 tensors in memory."""
