"""Decoded images/s of kivfm's input pipeline, so a user can see whether a host feeds its chips:

  python -m benchmarks.input [--folder=DIR] [--workers=0,1,2,4] [--out=benchmarks/results]

For each worker count: `kivfm.data.pipeline.make_iterator` over an image folder (JPEG decode,
random-resized crop, flip, batching: what training does per image), timed over `--batches`
batches after the first (which starts the workers). Without --folder the images are a folder of
JPEGs written once from the offline photos (scikit-image / scikit-learn, ~500 px, `--images`
copies), like an ImageNet folder; --tfds=NAME[:SPLIT] times a prepared TFDS dataset instead.
Writes OUT/input_benchmark.json and prints a table with the host's core count and
`pipeline.auto_workers()`, the default of config.data.worker_count=-1.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from PIL import Image

from kivfm import config as config_lib
from kivfm.data import offline, pipeline


def photo_folder(directory: str, images: int, side: int = 500) -> str:
  """DIR/photos/*.jpg: `images` JPEGs (quality 90) cycled from the offline photos at ~`side` px."""
  folder = os.path.join(directory, 'photos')
  os.makedirs(folder, exist_ok=True)
  photos = [Image.fromarray(image).convert('RGB') for _, image in offline.load_photos()]
  for i in range(images):
    photo = photos[i % len(photos)]
    scale = side / max(photo.size)
    resized = photo.resize((round(photo.width * scale), round(photo.height * scale)))
    resized.save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)
  return directory


def measure(config, batches: int) -> dict:
  """images/s of `batches` batches of config's pipeline, after its first batch."""
  iterator = pipeline.make_iterator(config, 0, 1)
  t0 = time.perf_counter()
  next(iterator)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
  seconds = time.perf_counter() - t0
  assert batch['image'].shape[0] == config.data.batch_size
  return {'workers': config.data.worker_count, 'first_batch_s': first,
          'images_per_s': batches * config.data.batch_size / seconds}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--folder', default='', help='image folder (class sub-folders)')
  parser.add_argument('--tfds', default='', help='a prepared TFDS dataset NAME[:SPLIT]')
  parser.add_argument('--workers', default='0,1,2', help='worker counts to time')
  parser.add_argument('--images', type=int, default=512, help='photos copied into the folder')
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--batches', type=int, default=10)
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--out', default='benchmarks/results')
  args = parser.parse_args(argv)

  config = config_lib.defaults()
  config.data.update(batch_size=args.batch_size, image_size=args.image_size)
  with tempfile.TemporaryDirectory() as scratch:
    if args.tfds:
      name, _, split = args.tfds.partition(':')
      config.data.update(source='tfds', tfds_name=name, tfds_split=split or 'train')
      what = f'tfds {args.tfds}'
    else:
      folder = args.folder or photo_folder(scratch, args.images)
      config.data.update(source='folder', folder=folder)
      what = f'folder {args.folder or f"({args.images} offline photos as ~500 px JPEGs)"}'
    rows = []
    for workers in (int(w) for w in args.workers.split(',')):
      config.data.worker_count = workers
      rows.append(measure(config, args.batches))
  cores = len(os.sched_getaffinity(0))
  result = {'source': what, 'cores': cores, 'auto_workers': pipeline.auto_workers(),
            'batch_size': args.batch_size, 'image_size': args.image_size, 'rows': rows}
  print(f'{what}, {args.image_size} px views, batch {args.batch_size}, {cores} cores '
        f'(worker_count=-1 -> {result["auto_workers"]} workers)')
  print('| workers | images/s | first batch s |\n|---:|---:|---:|')
  for row in rows:
    print(f'| {row["workers"]} | {row["images_per_s"]:.0f} | {row["first_batch_s"]:.1f} |')
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'input_benchmark.json'), 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
