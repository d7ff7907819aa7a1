"""Custom kernels: fused CPU attention (`attention`)."""
