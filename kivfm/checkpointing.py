"""orbax checkpoints of the training state, the data iterator and the config.

Frozen teachers (and the frozen student base) are never written: they are reloaded from their
sources. Saves are async and atomic (orbax commits a step only when it is complete).
"""
from __future__ import annotations

import grain
import jax
import orbax.checkpoint as ocp

from kivfm import paths


class Checkpointer:
  """DIR/checkpoints/<step>/{state, data, config}; keeps the last `keep` steps."""

  def __init__(self, workdir: str, *, keep: int, every: int):
    self.directory = paths.path(workdir) / 'checkpoints'
    self.every = every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def is_due(self, step: int) -> bool:
    return step % self.every == 0

  def save(self, step: int, state, data_iterator, config_dict: dict, *, force: bool = False):
    """Saves when `step` is a multiple of `every` (or `force`); returns whether it saved."""
    if not force and not self.is_due(step):
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config_dict)), force=force)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto the shardings carried by `abstract_state` (any mesh) and, when
    given, the data iterator in place."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))['state']

  def reached_preemption(self, step: int) -> bool:
    """True on every process once a preemption notice reached any (multi-host runs)."""
    return jax.process_count() > 1 and self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
