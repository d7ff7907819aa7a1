"""benchmarks/: the quick run of `python -m benchmarks.step` writes every variant, and the
PyTorch peer computes kivfm's train step (loss, gradient norm, updates) from the same weights."""
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='the peer is PyTorch')
pytest.importorskip('efficientnet_lite_pytorch', reason='the peer uses efficientnet-lite-pytorch')
pytest.importorskip('transformers', reason='the peer uses transformers Dinov2Model')

from benchmarks import kivfm_side, parity, step as bench_step, torch_peer  # noqa: E402
from kivfm.teachers import registry, vit_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_writes_every_variant(tmp_path):
  # One CPU device (the tests' 8 fake ones would split tiny batches); cheap compiles kept.
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env = {**os.environ, 'XLA_FLAGS': ' '.join(flags)}
  done = subprocess.run([sys.executable, '-m', 'benchmarks.step', '--quick', f'--out={tmp_path}'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((tmp_path / 'step_benchmark.json').read_text())
  assert (tmp_path / 'step_benchmark.png').stat().st_size > 10_000

  plan = bench_step.QUICK
  want = {(g, s.name, s.batch, s.size) for g, specs in bench_step.groups(plan, False)
          for s in specs}
  rows = {(v['group'], v['name'], v['batch'], v['size']): v for v in results['variants']}
  assert set(rows) == want
  for key, v in rows.items():
    assert 'skipped' not in v, (key, v['skipped'])
    assert len(v['times']) >= 2 * plan.steps, key
    numbers = [*v['times'], *v['summary'].values(), v['peak_rss_mb'], v['first_call_s'],
               v['flops_per_image'], v['flops_per_s'], v['utilization']]
    numbers += [v['xla_temp_mb']] if v['framework'] == 'kivfm' else []
    assert all(math.isfinite(x) and x > 0 for x in numbers), (key, numbers)
  for group in ('compare B8 32px', 'compare B8 64px'):
    counts = {v['trainable_params'] for v in results['variants'] if v['group'] == group}
    assert len(counts) == 1 and counts.pop() > 0
  peak = results['matmul_peak']
  assert peak['peak'] == max(peak['jax'], peak['torch']) > 0
  assert results['machine']['cores'] > 0 and results['machine']['jax'] == jax.__version__
  assert 'kivfm / torch fp32 at B8 32px' in done.stdout
  assert 'kivfm / torch bf16 autocast at B8 32px' in done.stdout


def test_dinov2_config_round_trips():
  arch = registry.get(kivfm_side.STUDENT).arch
  assert vit_port.config_from_hf(kivfm_side.dinov2_config(arch)) == arch


def test_peer_computes_kivfm_step_from_the_same_weights():
  """Tiny DINOv2 + EfficientNet-Lite0 (its input resized to 48 px), random torch weights
  copied into kivfm, adapters' Up weights perturbed so they count: the same loss and gradient
  norm at step 0, and the same losses after AdamW updates (warm-up of one step)."""
  config = kivfm_side.make_config(8, 64, kb='tiny-dino', hidden=32)
  config.teachers.effnet.image_size = 48
  config.optim.warmup_steps = 1
  config.total_steps = 10
  images = np.random.RandomState(0).randint(0, 256, (8, 64, 64, 3), dtype=np.uint8)
  ours = kivfm_side.KivfmStep(config, images)
  peer = torch_peer.Trainer(kivfm_side.recipe(config))
  assert ours.trainable_params == sum(p.numel() for p in peer.peer.trainable())
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for adapter in peer.peer.student.adapters:
      adapter.up.weight.copy_(0.05 * torch.randn(adapter.up.weight.shape, generator=generator))
  parity.load_peer_weights(ours, peer.peer)
  x = torch.from_numpy(images)
  for i in range(4):   # lr 0 at step 0, then 1e-3 with cosine decay
    with jax.set_mesh(ours.mesh):
      ours.state, got = ours.step(ours.state, ours.run.frozen, ours.teachers, ours.images, False)
    want = peer.step(x)
    for key in ('loss', 'grad_norm', 'loss/dino', 'loss/effnet', 'preservation', 'lr'):
      tol = 1e-4 * max(1.0, abs(float(want[key])))
      assert abs(float(got[key]) - float(want[key])) < tol, (i, key, got[key], want[key])


def test_input_benchmark_times_the_folder_pipeline_per_worker_count(tmp_path):
  from benchmarks import input as input_benchmark
  result = input_benchmark.main(['--images=12', '--batch-size=4', '--batches=2', '--workers=0,1',
                                 '--image-size=32', f'--out={tmp_path}'])
  assert [row['workers'] for row in result['rows']] == [0, 1]
  assert all(np.isfinite(row['images_per_s']) and row['images_per_s'] > 0
             for row in result['rows'])
  assert json.loads((tmp_path / 'input_benchmark.json').read_text()) == result


def test_groups_are_selected_by_name_prefix():
  plan_groups = bench_step.groups(bench_step.QUICK, False)
  names = lambda wanted: [name for name, _ in bench_step.select(plan_groups, wanted)]
  assert names('') == [name for name, _ in plan_groups]
  assert names('compare') == ['compare B8 32px', 'compare B8 64px', 'compare bf16 B8 32px']
  assert names('compare bf16') == ['compare bf16 B8 32px']
  assert names('options, batch') == ['options', 'batch']
  with pytest.raises(SystemExit, match='matches no group'):
    names('nope')
