"""The config schema: every key kivfm reads, its default, and validation before anything compiles.

Config files (`configs/*.py`) start from `defaults()` (a locked ConfigDict, so a misspelt key
fails at once) and add teachers with `teacher(...)`. `validate` checks the resolved config
against this schema and the machine, and raises one `ConfigError` naming the key and the
allowed values.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from kivfm import evals, sharding
from kivfm.data import sources
from kivfm.errors import ConfigError
from kivfm.models.vit import ATTENTION
from kivfm.teachers import registry

ConfigDict = ml_collections.ConfigDict

DTYPES = ('float32', 'bfloat16')
ADAPTERS = ('bottleneck', 'lora', 'none')
DISTANCES = ('cosine', 'smooth_l1', 'mse', 'cos_smooth_l1')
NORMALIZERS = ('none', 'zscore', 'ema_zscore', 'phi_s')
MESH_AXES = ('data', 'fsdp', 'model')
HEAD_OUTPUTS = ('logits', 'saliency', 'embedding', 'neck')

# Logical axis -> mesh axes. Every logical name used by a model must appear here.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('conv_in', None),
    ('conv_out', 'model'),
    ('classes', None),
    ('tokens', None),
    ('norm', None),
)


def teacher(name: str, *, weight: float = 1.0, weights: str = 'pretrained',
            dtype: str = 'bfloat16', image_size: int = 0) -> ConfigDict:
  """One teacher entry of `config.teachers`.

  name: a registry name (`kivfm.teachers.registry.names()`); weight: loss weight w_t;
  weights: 'pretrained' (the registry's source), 'random' (tests), or a local file path;
  dtype: compute dtype of the frozen teacher; image_size: side the teacher resizes the view
  to (0: its registry resolution).
  """
  cfg = ConfigDict(dict(name=name, weight=weight, weights=weights, dtype=dtype,
                        image_size=image_size))
  cfg.lock()
  return cfg


def defaults() -> ConfigDict:
  """Every key with its default. `teachers` is open: keys are teacher aliases."""
  c = ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.dtype = 'float32'                 # compute dtype of the student and heads
  c.log_every = 10
  c.grad_share_every = 10             # per-teacher gradient norms (T extra backward passes); 0: off
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.max_consecutive_nonfinite = 5     # stop after this many skipped updates in a row
  c.progress = 'auto'                 # auto | bar | lines | none

  c.distributed = ConfigDict(dict(
      enabled=False,                  # call jax.distributed.initialize
      coordinator_address='',         # empty: let JAX detect (TPU pods, SLURM)
      num_processes=0,                # 0: detect
      process_id=-1,                  # -1: detect
      local_device_ids=(),            # (): detect; GPUs: the ones this process drives
      cpu_collectives='gloo',         # CPU multi-process collectives
  ))
  c.mesh = ConfigDict(dict(shape=(-1, 1, 1), axes=MESH_AXES))
  c.sharding = ConfigDict(dict(rules=DEFAULT_RULES))

  c.data = ConfigDict(dict(
      # synthetic | tfds | folder | fashion_mnist | photos | mixture (kivfm/data/sources.py)
      source='synthetic',
      num_examples=1024,              # synthetic: size of the dataset
      image_size=224,                 # side of the augmented view fed to every model
      # A teacher resizes the view to its own image_size (teacher(..., image_size=) or its
      # registry resolution); enlarging it more than this adds compute, not detail: an error
      # (0: no limit). Pick a view at the largest useful teacher resolution / this factor.
      max_teacher_upsample=2.0,
      batch_size=64,                  # global batch
      shuffle_seed=0,
      crop_scale=(0.35, 1.0),         # random-resized-crop area range
      worker_count=-1,                # grain worker processes per host (0: the main process;
                                      # -1: pipeline.auto_workers() from the host's cores)
      tfds_name='imagenet2012',       # tfds: a TFDS dataset prepared as array_record
      tfds_split='train',             # tfds and fashion_mnist: split ('train[:10%]' works)
      tfds_data_dir='',               # TFDS data dir of tfds and the offline builder ('': default)
      folder='',                      # folder: directory of class sub-folders of images
      # mixture: ((spec, weight), ...), spec = synthetic | tfds:NAME[:SPLIT] | folder:PATH |
      # fashion_mnist[:SPLIT] | photos, e.g. (('tfds:imagenet2012', 0.7), ('folder:/x', 0.3))
      mixture=(),
      max_examples=0,                 # > 0: only the first N examples of each source
      fashion_mnist_dir='/usr/share/datasets/fashion-mnist',  # Debian dataset-fashion-mnist files
      prepare_offline=True,           # prepare fashion_mnist / photos on first use (seconds)
  ))

  c.student = ConfigDict(dict(
      knowledge_base='',              # alias in `teachers` whose model the student inherits
      adapter='bottleneck',           # bottleneck | lora | none (= full fine-tuning)
      adapter_dim=64,                 # bottleneck width
      adapter_scale=1.0,              # s in h + s * Up(GELU(Down(LN(h))))
      lora_rank=8,
      lora_alpha=16.0,
      remat=False,                    # rematerialise transformer blocks
      # Adapters in the last K blocks only (0: every block). The frozen blocks below them run
      # once per step, shared with the knowledge-base teacher, and get no backward pass.
      adapter_blocks=0,
  ))
  # How every ViT (student and teachers) computes attention (`kivfm.models.vit.attention`):
  # the same result, different memory and speed.
  c.attention = ConfigDict(dict(
      # plain: [B, H, N, N] logits | blocked: flash-style, no N x N array forward or backward
      # (memory for speed) | fused: jax.nn.dot_product_attention (cuDNN on GPU) | auto: fused
      # without a bias on GPU in bf16, else blocked above `auto_tokens` tokens per sequence or
      # window (SAM's 64x64 global blocks), else plain
      impl='auto',
      chunks=(256, 512),              # blocked: (queries per chunk, keys per block)
      auto_tokens=1024,               # auto: longest sequence kept on the plain path
  ))
  c.teachers = ConfigDict()
  # A teacher-target cache (`python -m kivfm.cache`): training reads the teachers' targets from
  # this directory instead of running them. '': run the teachers online.
  c.teacher_cache = ''
  c.cache = ConfigDict(dict(          # building a teacher-target cache (kivfm/cache.py)
      views=4,                        # augmented views per image: records = examples * views
      dtype='int8',                   # int8 (per-channel float16 scales) | bfloat16
      # ((alias, dims), ...): store that teacher's patch maps as `dims` principal components
      # (decoded back to full width on read), e.g. (('dino', 192),); others keep full width
      pca_dim=(),
      pca_fit_examples=256,           # examples (all their views) the PCA is fitted on
      chunk_examples=1024,            # examples per chunk file: the unit of resuming
      batch_size=64,                  # views per teacher forward pass, per process
      # Also store the student's trunk: the tokens entering its first adapted block (needs
      # student.adapter_blocks > 0). Training from such a cache starts there: no view is
      # rebuilt and no block below the adapters runs. Set it for building and training.
      student_trunk=False,
  ))
  c.unifier = ConfigDict(dict(
      hidden=1024,                    # s2t MLP hidden width
      layers=2,                       # s2t MLP depth
      shared_dim=256,                 # width of the shared latent space; 0 = teacher space only
      normalizer='none',              # teacher features: none | zscore | ema_zscore | phi_s
      ema_momentum=0.99,
      stats_dir='',                   # zscore / phi_s statistics (default DIR/teacher_stats)
  ))
  c.loss = ConfigDict(dict(
      patch='cos_smooth_l1',          # distance on patch maps
      global_='cosine',               # distance on global vectors
      cos_weight=0.9,                 # mix of cos_smooth_l1: cos_weight * (1-cos) + rest * SmoothL1
      global_weight=1.0,
      patch_weight=1.0,
      shared_weight=1.0,              # lambda: alignment in the shared latent space
      recon_weight=1.0,               # codes must reconstruct the teacher features (anti-collapse)
      preservation_weight=0.1,        # distance of the student to the knowledge-base teacher
      # Distillation through the teachers' own heads: what each native head (EfficientNet's
      # classifier, the saliency decoder, CLIP's projection, SAM's neck) makes of the student's
      # prediction against what it makes of the teacher's features (losses.head_distance).
      head_weight=0.0,
      head_outputs=HEAD_OUTPUTS,      # which native heads head_weight distils
      head_temperature=1.0,           # softmax temperature of the classifier term
  ))
  c.optim = ConfigDict(dict(
      lr=1e-3,
      warmup_steps=100,
      end_lr_fraction=0.0,            # cosine decays to lr * this
      weight_decay=0.05,
      b1=0.9,
      b2=0.999,
      clip_norm=1.0,                  # global-norm clipping; 0 disables
      # Ordered (regex, lr multiplier) over parameter paths like 'student/vit/blocks/0/...'.
      # The first match wins; a parameter that matches no group is frozen.
      groups=(('.*/adapter/.*|.*/lora_[ab]', 1.0), ('unifier/.*', 1.0)),
      no_decay=r'.*(norm|bias|pos_embed|cls_token|registers|gamma|lora_b).*',
  ))
  # Evaluators run at the end of training and every `every` steps: name -> evaluator(...).
  c.evals = ConfigDict()
  c.lock()
  c.teachers.unlock()
  c.evals.unlock()
  return c


def evaluator(kind: str, *, every: int = 0, **options) -> ConfigDict:
  """One entry of `config.evals`: evaluator `kind` (`kivfm.evals.EVALUATORS`), run at the end
  of training and every `every` steps (0: only at the end), with its own `options` (the rest
  keep the evaluator's DEFAULTS)."""
  if kind not in evals.EVALUATORS:
    raise ConfigError(f'evaluator kind {kind!r} is not allowed; choose one of: '
                      f'{", ".join(evals.EVALUATORS)}')
  defaults = evals.EVALUATORS[kind].DEFAULTS
  unknown = sorted(set(options) - set(defaults))
  if unknown:
    raise ConfigError(f'unknown option(s) {", ".join(unknown)} of evaluator {kind!r}; allowed: '
                      f'every, {", ".join(sorted(defaults))}')
  cfg = ConfigDict(dict(kind=kind, every=every, **{**defaults, **options}))
  cfg.lock()
  return cfg


def parse_arg(arg: str, file: str, **kinds) -> dict:
  """Named arguments of a config file (`--config=FILE:ARG`), one parser for every file:
  'norm=phi_s,smoke' -> {'norm': 'phi_s', 'smoke': True}. `kinds`: name -> bool (a flag,
  default False), str (any value) or a tuple of allowed values; non-flags are required."""
  usage = ', '.join(name if kind is bool else
                    f'{name}={"|".join(kind) if isinstance(kind, tuple) else "VALUE"}'
                    for name, kind in kinds.items())
  values = {name: False for name, kind in kinds.items() if kind is bool}
  for part in filter(None, arg.split(',')):
    name, has_value, value = part.partition('=')
    kind = kinds.get(name)
    if kind is None:
      raise ConfigError(f'{file}: unknown argument {name!r}; arguments: {usage}')
    if (kind is bool) == bool(has_value):
      raise ConfigError(f'{file}: argument {part!r} is malformed; arguments: {usage}')
    if isinstance(kind, tuple) and value not in kind:
      raise ConfigError(f'{file}: {name}={value!r} is not allowed; choose one of: '
                        f'{", ".join(kind)}')
    values[name] = True if kind is bool else value
  missing = [name for name in kinds if name not in values]
  if missing:
    raise ConfigError(f'{file}: argument {missing[0]}=... is required; arguments: {usage}')
  return values


def load(spec: str) -> ConfigDict:
  """Loads a config file the way --config does: 'configs/base.py' or 'configs/base.py:arg'."""
  import importlib.util
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('kivfm_config_file', path)
  if module_spec is None:
    raise ConfigError(f'cannot load config file {path!r}')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def from_dict(values: dict) -> ConfigDict:
  """Rebuilds a config from its JSON form (DIR/config.json): lists become tuples again."""
  tuples = lambda v: tuple(tuples(x) for x in v) if isinstance(v, list) else v
  config = defaults()

  def fill(cfg, vals, prefix):
    for key, value in vals.items():
      if prefix == 'teachers':
        cfg[key] = teacher(**value)
      elif prefix == 'evals':
        cfg[key] = evaluator(**value)
      elif isinstance(value, dict):
        fill(cfg[key], value, key)
      else:
        cfg[key] = tuples(value)
  fill(config, values, '')
  return config


def _schema_errors(cfg: Any, schema: Any, prefix: str) -> list[str]:
  errors = []
  for key in cfg.keys():
    path = f'{prefix}.{key}'
    if key not in schema:
      allowed = ', '.join(sorted(schema.keys()))
      errors.append(f'unknown key config{path}; allowed keys here: {allowed}')
    elif isinstance(schema[key], ConfigDict) and schema[key].keys():
      if not isinstance(cfg[key], ConfigDict):
        errors.append(f'config{path} must be a group of keys, got {cfg[key]!r}')
      else:
        errors.extend(_schema_errors(cfg[key], schema[key], path))
  return errors


def _allowed(key: str, value: Any, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f'config.{key}={value!r} is not allowed; choose one of: '
                      f'{", ".join(map(str, allowed))}')


def _positive(config: ConfigDict, *keys: str) -> None:
  for key in keys:
    value = config
    for part in key.split('.'):
      value = value[part]
    if not (isinstance(value, (int, float)) and value > 0):
      raise ConfigError(f'config.{key}={value!r} must be a positive number')


def _validate_cache(config: ConfigDict) -> None:
  """config.cache: the settings of `python -m kivfm.cache`."""
  cache = config.cache
  _allowed('cache.dtype', cache.dtype, ('int8', 'bfloat16'))
  for key in ('views', 'pca_fit_examples', 'chunk_examples', 'batch_size'):
    if not (isinstance(cache[key], int) and cache[key] > 0):
      raise ConfigError(f'config.cache.{key}={cache[key]!r} must be a positive integer')
  if cache.batch_size < cache.views:
    raise ConfigError(f'config.cache.batch_size={cache.batch_size} must be >= config.cache.views='
                      f'{cache.views} (one forward pass holds all views of an image)')
  for entry in cache.pca_dim:
    if (len(entry) != 2 or entry[0] not in config.teachers or not isinstance(entry[1], int)
        or entry[1] <= 0):
      raise ConfigError(f'config.cache.pca_dim entry {entry!r} must be (teacher alias, dims > 0) '
                        f'with an alias of config.teachers ({", ".join(config.teachers)})')
  if cache.student_trunk and not config.student.adapter_blocks:
    raise ConfigError('config.cache.student_trunk=True stores the tokens below the first adapted '
                      'block, so it needs config.student.adapter_blocks > 0 (adapters in the '
                      'last K blocks only)')


def _validate_attention(attention: ConfigDict) -> None:
  """config.attention: how the ViTs compute attention (kivfm.models.vit.with_attention)."""
  _allowed('attention.impl', attention.impl, ATTENTION)
  chunks = tuple(attention.chunks)
  if len(chunks) != 2 or not all(isinstance(n, int) and n > 0 for n in chunks):
    raise ConfigError(f'config.attention.chunks={attention.chunks!r} must be two positive '
                      f'integers: (queries per chunk, keys per block)')
  if not (isinstance(attention.auto_tokens, int) and attention.auto_tokens >= 0):
    raise ConfigError(f'config.attention.auto_tokens={attention.auto_tokens!r} must be an '
                      f'integer >= 0')


def validate(config: ConfigDict, num_devices: int, num_processes: int = 1) -> None:
  """Raises ConfigError naming the first wrong key; checks the schema, values and the machine."""
  schema = defaults()
  errors = _schema_errors(config, schema, '')
  team_schema = teacher('x')
  for alias, spec in config.teachers.items():
    if not isinstance(spec, ConfigDict):
      errors.append(f'config.teachers.{alias} must be made with kivfm.config.teacher(...)')
    else:
      errors.extend(_schema_errors(spec, team_schema, f'.teachers.{alias}'))
  for name, spec in config.evals.items():
    if not isinstance(spec, ConfigDict):
      errors.append(f'config.evals.{name} must be made with kivfm.config.evaluator(...)')
  if errors:
    raise ConfigError('\n'.join(errors))

  _allowed('dtype', config.dtype, DTYPES)
  _allowed('progress', config.progress, ('auto', 'bar', 'lines', 'none'))
  _allowed('student.adapter', config.student.adapter, ADAPTERS)
  _allowed('loss.patch', config.loss.patch, DISTANCES)
  _allowed('loss.global_', config.loss.global_, DISTANCES)
  sources.validate(config.data)   # data.source and the keys it needs
  _allowed('unifier.normalizer', config.unifier.normalizer, NORMALIZERS)
  evals.validate(config.evals)
  if config.unifier.shared_dim < 0:
    raise ConfigError(f'config.unifier.shared_dim={config.unifier.shared_dim} must be >= 0 '
                      f'(0 = teacher space only)')
  if config.loss.head_weight < 0:
    raise ConfigError(f'config.loss.head_weight={config.loss.head_weight} must be >= 0 (0: off)')
  for output in config.loss.head_outputs:
    _allowed('loss.head_outputs', output, HEAD_OUTPUTS)
  if config.loss.head_weight and config.teacher_cache:
    raise ConfigError(f'config.loss.head_weight={config.loss.head_weight} needs the teachers\' '
                      f'heads online; config.teacher_cache={config.teacher_cache!r} holds their '
                      f'features only. Set one of them to its default (0 / \'\').')
  if config.grad_share_every < 0:
    raise ConfigError(f'config.grad_share_every={config.grad_share_every} must be >= 0 (0: off)')
  _positive(config, 'total_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints',
            'max_consecutive_nonfinite', 'data.batch_size', 'data.image_size',
            'data.num_examples', 'student.adapter_dim', 'student.lora_rank', 'unifier.hidden',
            'unifier.layers', 'optim.lr', 'loss.head_temperature')
  _validate_cache(config)
  _validate_attention(config.attention)
  for axis in config.mesh.axes:
    _allowed('mesh.axes', axis, MESH_AXES)
  mapped = {a for _, axes in config.sharding.rules
            for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))}
  for axis in sorted(mapped - set(config.mesh.axes)):
    raise ConfigError(f'config.sharding.rules maps to mesh axis {axis!r}, which is not in '
                      f'config.mesh.axes={tuple(config.mesh.axes)}')

  parallel = sharding.batch_parallelism(config.mesh, config.sharding.rules, num_devices)
  if config.data.batch_size % parallel:
    raise ConfigError(f'config.data.batch_size={config.data.batch_size} is not divisible by the '
                      f'data-parallel size {parallel} (mesh '
                      f'{sharding.mesh_shape(config.mesh, num_devices)}, '
                      f'batch axes of config.sharding.rules)')
  if config.data.batch_size % num_processes:
    raise ConfigError(f'config.data.batch_size={config.data.batch_size} is not divisible by the '
                      f'{num_processes} processes')

  if not config.teachers:
    raise ConfigError('config.teachers is empty; add at least the knowledge-base teacher')
  for alias, spec in config.teachers.items():
    _allowed(f'teachers.{alias}.name', spec.name, registry.names())
    _allowed(f'teachers.{alias}.dtype', spec.dtype, DTYPES)
    if spec.weight < 0:
      raise ConfigError(f'config.teachers.{alias}.weight={spec.weight} must be >= 0')
  _allowed('student.knowledge_base', config.student.knowledge_base, tuple(config.teachers))
  kb = registry.get(config.teachers[config.student.knowledge_base].name)
  if kb.family != 'vit':
    raise ConfigError(f'config.student.knowledge_base={config.student.knowledge_base!r} is a '
                      f'{kb.family} teacher; the student inherits a ViT (e.g. a DINOv2)')
  if not 0 <= config.student.adapter_blocks <= kb.arch.depth:
    raise ConfigError(f'config.student.adapter_blocks={config.student.adapter_blocks} must be in '
                      f'[0, {kb.arch.depth}] (the knowledge base has {kb.arch.depth} blocks; '
                      f'0: adapters in every block)')
  if config.data.image_size % kb.arch.patch_size:
    raise ConfigError(f'config.data.image_size={config.data.image_size} is not a multiple of the '
                      f'student patch size {kb.arch.patch_size}')
