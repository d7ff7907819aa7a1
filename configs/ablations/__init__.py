"""Ablations of the base recipe (each derives from `configs.base`)."""
