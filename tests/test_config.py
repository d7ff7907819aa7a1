"""Bad configs fail fast, before anything compiles, with the key and the allowed values named."""
import subprocess
import sys

import pytest

from kivfm import config as config_lib

SMOKE = 'configs/base.py:smoke'


def smoke():
  return config_lib.load(SMOKE)


def check(config, match, devices=8):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config, devices)


def test_smoke_config_is_valid():
  config_lib.validate(smoke(), 8)


def test_misspelt_key_in_a_config_file_fails_at_once():
  config = smoke()
  with pytest.raises(AttributeError, match='lr_rate'):
    config.optim.lr_rate = 1.0


def test_unknown_key_added_behind_the_schema_is_named():
  config = smoke()
  with config.unlocked():
    config.optim.lr_rate = 1.0
  check(config, r'unknown key config\.optim\.lr_rate; allowed keys here: .*b1')


def test_unknown_teacher_key_is_named():
  config = smoke()
  with config.teachers.dino.unlocked():
    config.teachers.dino.wieght = 2.0
  check(config, r'config\.teachers\.dino\.wieght')


@pytest.mark.parametrize('key, value, match', [
    ('mesh.shape', (3, 1, 1), r'config\.mesh\.shape=\(3, 1, 1\) does not fit 8 devices'),
    ('mesh.shape', (-1, -1, 1), r'at most one -1'),
    ('mesh.shape', (2, 2, 1), r'uses 4 devices but 8 are present'),
    ('data.batch_size', 12, r'config\.data\.batch_size=12 is not divisible by the data-parallel '
                            r'size 8'),
    ('student.adapter', 'prefix', r"config\.student\.adapter='prefix' .* bottleneck, lora, none"),
    ('dtype', 'float16', r"config\.dtype='float16' .* float32, bfloat16"),
    ('loss.patch', 'l3', r"config\.loss\.patch='l3'"),
    ('student.knowledge_base', 'clip', r"config\.student\.knowledge_base='clip' .* dino, vitb"),
    ('total_steps', 0, r'config\.total_steps=0 must be a positive number'),
    ('data.image_size', 36, r'image_size=36 is not a multiple of the student patch size 8'),
])
def test_bad_values_name_the_key(key, value, match):
  config = smoke()
  group, _, leaf = key.rpartition('.')
  (config[group] if group else config)[leaf] = value
  check(config, match)


def test_batch_checked_against_data_times_fsdp():
  config = smoke()
  config.mesh.shape = (2, 2, 2)
  config.data.batch_size = 6   # divisible by data (2) but not by data x fsdp (4)
  check(config, r'data-parallel size 4')


def test_unknown_teacher_name_lists_the_registry():
  config = smoke()
  config.teachers.vitb.name = 'dinov5'
  check(config, r"config\.teachers\.vitb\.name='dinov5' is not allowed; choose one of: .*tiny-dino")


def test_sharding_rule_to_missing_mesh_axis():
  config = smoke()
  config.sharding.rules = (('batch', 'data'), ('embed', 'expert'))
  check(config, r"mesh axis 'expert'")


def test_command_line_override_of_unknown_key_fails_before_training(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'kivfm.main', f'--config={SMOKE}', f'--workdir={tmp_path}',
       '--config.optim.learning_rate=1'], capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'learning_rate' in proc.stderr
  assert not (tmp_path / 'checkpoints').exists()


def test_command_line_bad_value_exits_with_one_message(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'kivfm.main', f'--config={SMOKE}', f'--workdir={tmp_path}',
       '--config.mesh.shape=(3,1,1)'], capture_output=True, text=True, timeout=120,
      env={**__import__('os').environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert proc.returncode == 1
  assert 'config error: config.mesh.shape=(3, 1, 1) does not fit 8 devices' in proc.stderr


def _config_files():
  import glob
  files = sorted(glob.glob('configs/*.py') + glob.glob('configs/ablations/*.py'))
  return [f for f in files if not f.endswith('__init__.py')]


@pytest.mark.parametrize('path', _config_files())
def test_every_config_file_loads_and_validates(path):
  # The demo is sized for one CPU device (batch 12); the rest for 8.
  full, smoke_arg, devices = {
      'configs/ablations/leave_one_out.py': ('drop=clip', 'drop=vitb,smoke', 8),
      'configs/ablations/normalizer.py': ('norm=zscore', 'norm=phi_s,smoke', 8),
      'configs/demo.py': ('', 'short', 1)}.get(path, ('', 'smoke', 8))
  config_lib.validate(config_lib.load(f'{path}:{full}' if full else path), devices)
  config_lib.validate(config_lib.load(f'{path}:{smoke_arg}'), 8)


def test_leave_one_out_refuses_the_knowledge_base():
  with pytest.raises(ValueError, match="cannot drop 'dino'"):
    config_lib.load('configs/ablations/leave_one_out.py:drop=dino,smoke')


def test_config_files_are_a_package_with_named_arguments():
  for path in _config_files():
    text = open(path).read()
    assert 'sys.path' not in text and 'importlib' not in text, path
    assert 'python -m kivfm' in text and 'Expected' in text, f'{path}: command and result'
  with pytest.raises(config_lib.ConfigError, match=r"unknown argument 'smok'; arguments: smoke"):
    config_lib.load('configs/base.py:smok')
  with pytest.raises(config_lib.ConfigError, match=r"norm='l2' is not allowed; choose one of: "
                                                   r"none, zscore, ema_zscore, phi_s"):
    config_lib.load('configs/ablations/normalizer.py:norm=l2')
  with pytest.raises(config_lib.ConfigError, match=r'argument norm=\.\.\. is required'):
    config_lib.load('configs/ablations/normalizer.py:smoke')
  assert config_lib.parse_arg('drop=clip,smoke', 'f', drop=str, smoke=bool) == {
      'drop': 'clip', 'smoke': True}


def test_a_teacher_may_enlarge_the_view_at_most_max_teacher_upsample_times():
  from kivfm import assembly
  from kivfm.teachers import registry
  config = config_lib.load('configs/base.py')   # a 224 px view; SAM at 448 px: 2x
  sam = registry.get('sam-vitb')
  assembly.check_upsampling(config, 'sam', sam)
  config.teachers.sam.image_size = 0              # SAM's own 1024 px: 4.6x
  with pytest.raises(config_lib.ConfigError, match=r'teacher sam \(sam-vitb\) would see the 224 '
                     r'px view enlarged to 1024 px, 4.6x .*teachers.sam.image_size <= 448.*'
                     r'image_size to >= 512'):
    assembly.check_upsampling(config, 'sam', sam)
  config.data.max_teacher_upsample = 0            # no limit
  assembly.check_upsampling(config, 'sam', sam)


def test_demo_variants_change_only_what_they_name():
  base = config_lib.load('configs/demo.py')
  assert base.loss.head_weight > 0 and base.unifier.shared_dim > 0
  for arg, changes in (('teacher_space', {'unifier.shared_dim': 0, 'unifier.normalizer': 'none'}),
                       ('no_head_loss', {'loss.head_weight': 0.0})):
    variant = config_lib.load(f'configs/demo.py:{arg}')
    for key, value in changes.items():
      group, leaf = key.split('.')
      assert variant[group][leaf] == value
      variant[group][leaf] = base[group][leaf]
    assert variant.to_dict() == base.to_dict(), arg
  long = config_lib.load('configs/demo.py:long,teacher_space')
  assert long.total_steps > base.total_steps and long.evals.report.every > 0
  assert long.unifier.shared_dim == 0
  config_lib.validate(long, 1)
