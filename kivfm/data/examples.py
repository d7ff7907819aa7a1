"""Source records -> checked examples; a record that cannot be used becomes a `bad` marker.

An example is {'image': uint8 [H, W, 3], 'label': int32 (-1 if none), 'index': int32 (position
in its source), 'source': int32 (position in the mixture)}. Any failure to read or decode a record
(corrupt, truncated or non-image bytes, wrong dtype or shape, an I/O error) gives
{'bad': 'what went wrong'} instead, which the pipeline drops and counts; it never raises.
"""
from __future__ import annotations

import numpy as np
from absl import logging

from kivfm.data import images


def is_bad(element: dict) -> bool:
  return 'bad' in element


class Examples:
  """Random-access view of `source` (len + getitem) yielding examples or bad markers."""

  def __init__(self, source, source_id: int = 0, name: str = 'source'):
    self.source, self.source_id, self.name = source, source_id, name

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    where = f'{self.name}[{index}]'
    try:
      record = self.source[index]
      name = record.get('name') if isinstance(record, dict) else None
      where = f'{where} ({name})' if isinstance(name, str) else where
      image = images.to_rgb(record['image'], where)
      label = record.get('label', -1)
      label = int(label) if np.ndim(label) == 0 else -1
    except Exception as e:  # pylint: disable=broad-except  -- bad data must not stop a run
      message = str(e) if isinstance(e, images.BadImageError) else (
          f'{where}: {type(e).__name__}: {e}')
      logging.log_every_n_seconds(logging.WARNING, 'skipping bad record %s', 10, message)
      return {'bad': message}
    return {'image': image, 'label': np.int32(label), 'index': np.int32(index),
            'source': np.int32(self.source_id)}

  def __repr__(self) -> str:  # grain shows this in its dataset graph
    return f'Examples({self.name}, {len(self)} records)'
