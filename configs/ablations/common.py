"""Shared by the ablation configs: the base recipe (full, or ':smoke' for a quick check)."""
import importlib.util
import os

_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'base.py')


def base(arg: str = ''):
  spec = importlib.util.spec_from_file_location('kivfm_base_config', _BASE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
