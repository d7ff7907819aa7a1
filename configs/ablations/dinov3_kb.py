"""The base recipe with a DINOv3 knowledge base: DINOv3 ViT-B/16 (rotary positions, 4 storage
tokens) replaces DINOv2 ViT-B/14 as the inherited, frozen backbone and its teacher; CLIP ViT-L/14
and SAM ViT-B as in configs/base.py.

  python -m kivfm.main --config=configs/ablations/dinov3_kb.py --workdir=DIR   # ':smoke' checks
DINOv3's weights are gated on the Hugging Face Hub: accept the licence at
https://huggingface.co/facebook/dinov3-vitb16-pretrain-lvd1689m and log in (`hf auth login`), or
give the file: --config.teachers.dinov3.weights=/path/to/model.safetensors (the original
dinov3_vitb16_pretrain_lvd1689m-*.pth works too).
Expected: not run here (no accelerator, no ImageNet, no network for the weights), so its quality
is not measured; DINOv3 reports better dense (segmentation) features than DINOv2 at equal size
(its paper), which is what this ablation measures against configs/base.py. Its cost, from
`python -m kivfm.aot --config=configs/ablations/dinov3_kb.py --topology=8xH100` (XLA's plan on
CPU): 487 GFLOP per image (base recipe: 528; the student and its teacher see 14 x 14 patches
instead of 16 x 16), 47 GiB per device on 8 x H100 (base: 58), ~5.5 h at MFU 0.4 (base: ~5.9 h).
The smoke variant swaps the tiny DINOv2-shaped teacher for a tiny DINOv3-shaped one.
"""
from configs import base
from kivfm import config as config_lib


def get_config(arg: str = ''):
  config = base.get_config(arg)
  if config_lib.parse_arg(arg, 'configs/ablations/dinov3_kb.py', smoke=bool)['smoke']:
    config.teachers.dino.name = 'tiny-dinov3'
    return config
  del config.teachers['dinov2']
  config.teachers.dinov3 = config_lib.teacher('dinov3-vitb16', weight=1.0)
  config.student.knowledge_base = 'dinov3'
  return config
