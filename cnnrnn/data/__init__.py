"""Items and pictures as uint8 tensors in memory: where they come from, what they are, composites of them."""
