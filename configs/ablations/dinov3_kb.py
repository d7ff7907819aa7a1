"""The base recipe with a DINOv3 knowledge base: DINOv3 ViT-B/16 (rotary positions, 4 storage
tokens) replaces DINOv2 ViT-B/14 as the inherited, frozen backbone and its teacher; CLIP ViT-L/14
and SAM ViT-B as in configs/base.py.

  python -m kivfm.main --config=configs/ablations/dinov3_kb.py --workdir=DIR   # ':smoke' checks
DINOv3's weights are gated on the Hugging Face Hub: accept the licence at
https://huggingface.co/facebook/dinov3-vitb16-pretrain-lvd1689m and log in (`hf auth login`), or
give the file: --config.teachers.dinov3.weights=/path/to/model.safetensors (the original
dinov3_vitb16_pretrain_lvd1689m-*.pth works too).
Expected: not run here (no accelerator, no ImageNet, no network for the weights), so not
measured. At 224 px the student sees 14 x 14 patches (DINOv2-B/14: 16 x 16), so a step costs
about 0.8x the base recipe's student; DINOv3 reports higher dense (segmentation) quality than
DINOv2 at equal size (its paper), which is what this ablation measures against configs/base.py.
The smoke variant swaps the tiny DINOv2-shaped teacher for a tiny DINOv3-shaped one.
"""
from configs import base
from kivfm import config as config_lib


def get_config(arg: str = ''):
  config = base.get_config(arg)
  if config.student.knowledge_base == 'dino':   # smoke: tiny random teachers
    config.teachers.dino.name = 'tiny-dinov3'
    return config
  del config.teachers['dinov2']
  config.teachers.dinov3 = config_lib.teacher('dinov3-vitb16', weight=1.0)
  config.student.knowledge_base = 'dinov3'
  return config
