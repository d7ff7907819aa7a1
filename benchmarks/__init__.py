"""Benchmarks of kivfm: `python -m benchmarks.step` times the train step against a PyTorch peer
of the same algorithm (`benchmarks.torch_peer`)."""
