"""Protocol: zero-shot classification of Fashion-MNIST through every image-text teacher (CLIP,
SigLIP) of a run, by the teacher itself and by the student standing in for it.

  python -m kivfm.evaluate --config=configs/eval/zero_shot_fashion_mnist.py --workdir=RUN
  python -m kivfm.evaluate --config=configs/eval/zero_shot_fashion_mnist.py --workdir=OUT \\
      --model=teacher:clip-vitb16                   # the teacher alone (needs its weights)
Pinned: the first 2000 test images, centre square at 224 px, the 10 class names of
`kivfm.data.offline`, the six prompt templates of `kivfm.evals.zero_shot`. Text towers load from
the teacher's weight file (network on first use). `:tiny` (tests): 64 images at 32 px, random
text towers.
"""
from kivfm import config as config_lib


def get_config(arg: str = ''):
  config = config_lib.defaults()
  tiny = config_lib.parse_arg(arg, 'configs/eval/zero_shot_fashion_mnist.py', tiny=bool)['tiny']
  config.data.image_size = 32 if tiny else 224
  config.evals.zero_shot = config_lib.evaluator(
      'zero_shot', test='fashion_mnist:test', max_test=64 if tiny else 2000,
      classes='fashion_mnist', text_weights='random' if tiny else 'pretrained')
  return config
