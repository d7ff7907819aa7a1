"""kivfm: vision foundation models by knowledge inheritance (JAX / Flax NNX)."""
