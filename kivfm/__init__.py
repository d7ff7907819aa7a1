"""kivfm: vision foundation models by knowledge inheritance (JAX / Flax NNX)."""
import flax

# Weights are placed on the mesh by `jax.jit(..., out_shardings=...)` in `kivfm.sharding`,
# never eagerly at construction, so models can be built without a mesh in scope.
flax.config.update('flax_always_shard_variable', False)
