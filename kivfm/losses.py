"""Distances, and the KPU objective: per-teacher terms, shared space, preservation, diagnostics."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kivfm.models import layers


def _cosine_distance(pred, target):
  pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
  eps = 1e-6
  cos = (pred * target).sum(-1) / (
      jnp.maximum(jnp.linalg.norm(pred, axis=-1), eps) *
      jnp.maximum(jnp.linalg.norm(target, axis=-1), eps))
  return (1.0 - cos).mean()


def _smooth_l1(pred, target, beta: float = 1.0):
  diff = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta).mean()


def _mse(pred, target):
  return jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)).mean()


def distance(name: str, pred: jax.Array, target: jax.Array, cos_weight: float = 0.9) -> jax.Array:
  """Mean over tokens of a per-token distance on the last axis.

  cosine: 1 - cos; smooth_l1 / mse: elementwise, averaged over channels too;
  cos_smooth_l1: cos_weight * (1 - cos) + (1 - cos_weight) * smooth_l1 (AM-RADIO / Theia).
  """
  if pred.shape != target.shape:
    raise ValueError(f'prediction {pred.shape} and target {target.shape} differ in shape')
  if name == 'cosine':
    return _cosine_distance(pred, target)
  if name == 'smooth_l1':
    return _smooth_l1(pred, target)
  if name == 'mse':
    return _mse(pred, target)
  if name == 'cos_smooth_l1':
    return (cos_weight * _cosine_distance(pred, target) +
            (1.0 - cos_weight) * _smooth_l1(pred, target))
  raise ValueError(f'unknown distance {name!r}; allowed: cosine, smooth_l1, mse, cos_smooth_l1')


def head_distance(name: str, pred: jax.Array, target: jax.Array,
                  temperature: float = 1.0) -> jax.Array:
  """Distance between what a teacher's native head makes of the student's prediction (`pred`)
  and of the teacher's own features (`target`), by head output:
  logits: KL(softmax(target / T) || softmax(pred / T)) * T^2 (Hinton et al.'s distillation);
  saliency (probabilities): binary cross-entropy with the teacher's map as soft labels, minus
  its entropy (0 at equality); embedding / neck: 1 - cosine over the last axis.
  """
  pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
  if name == 'logits':
    log_p = jax.nn.log_softmax(target / temperature, axis=-1)
    log_q = jax.nn.log_softmax(pred / temperature, axis=-1)
    return (jnp.exp(log_p) * (log_p - log_q)).sum(-1).mean() * temperature ** 2
  if name == 'saliency':
    eps = 1e-6
    p, t = jnp.clip(pred, eps, 1 - eps), jnp.clip(target, eps, 1 - eps)
    return (t * (jnp.log(t) - jnp.log(p)) + (1 - t) * (jnp.log1p(-t) - jnp.log1p(-p))).mean()
  if name in ('embedding', 'neck'):
    return _cosine_distance(pred, target)
  raise ValueError(f'no head distance for teacher output {name!r}; allowed: logits, saliency, '
                   f'embedding, neck')


def _pair_distance(name: str, pred: dict, target: dict, cfg) -> jax.Array:
  """Global + patch distance of a {'cls', 'patches'} pair."""
  return (cfg.global_weight * distance(cfg.global_, pred['cls'], target['cls'], cfg.cos_weight) +
          cfg.patch_weight * distance(name, pred['patches'], target['patches'], cfg.cos_weight))


def _cosine_fidelity(pred: jax.Array, target: jax.Array) -> jax.Array:
  return 1.0 - _cosine_distance(pred, target)


def objective(outputs: dict, targets: dict, weights: dict, knowledge_base: str,
              cfg) -> tuple[jax.Array, dict]:
  """The KPU loss from the KPU's `outputs` (see `KPU.__call__`) and the teachers' `targets`,
  and the per-teacher terms and diagnostics. A pure function of its inputs.

  per teacher t:  s2t_t    = d(p_t, N_t(g_t))                       (teacher space)
                  shared_t = d_cos(z_s, z_t) + recon * d(R_t(z_t), N_t(g_t))
                  head_t   = sum over t's native heads h of d_h(h(N_t^-1(p_t)), h(g_t))
                  loss_t   = s2t_t + shared_weight * shared_t + head_weight * head_t
  total = sum_t w_t loss_t + preservation_weight * d(f(I), g_kb(I)).
  Collapse of the trainable teacher encoders E_t (a constant code makes d_cos vanish) is
  prevented by the reconstruction term: a constant code cannot reconstruct N_t(g_t), and the
  s2t term keeps the student anchored to the fixed teacher targets. head_t (`head_distance`)
  needs outputs['heads']: alias -> {output: head(prediction)}, and the same outputs in targets.
  """
  student, shared = outputs['student'], outputs['shared']
  terms, scalars = {}, {}
  for alias in sorted(targets):
    s2t = _pair_distance(cfg.patch, outputs['predictions'][alias], outputs['normalized'][alias],
                         cfg)
    loss = s2t
    scalars[f's2t/{alias}'] = s2t
    if alias in shared:
      sh = shared[alias]
      align = _pair_distance('cosine', sh['student'], sh['teacher'], cfg)
      recon = _pair_distance(cfg.patch, sh['recon'], sh['target'], cfg)
      loss = loss + cfg.shared_weight * (align + cfg.recon_weight * recon)
      scalars[f'shared/{alias}'], scalars[f'recon/{alias}'] = align, recon
    heads = outputs.get('heads', {}).get(alias)
    if cfg.head_weight and heads:
      head = sum(head_distance(name, heads[name], targets[alias][name], cfg.head_temperature)
                 for name in sorted(heads))
      loss = loss + cfg.head_weight * head
      scalars[f'head/{alias}'] = head
      if 'logits' in heads:
        scalars[f'head_agreement/{alias}'] = (
            jnp.argmax(heads['logits'], -1) == jnp.argmax(targets[alias]['logits'], -1)).mean()
    terms[alias] = loss
    raw, in_teacher_space = targets[alias], outputs['in_teacher_space'][alias]
    scalars[f'teacher_norm/{alias}'] = jnp.linalg.norm(
        raw['patches'].astype(jnp.float32), axis=-1).mean()
    scalars[f'prediction_norm/{alias}'] = jnp.linalg.norm(
        in_teacher_space['patches'].astype(jnp.float32), axis=-1).mean()
    scalars[f'fidelity/{alias}'] = _cosine_fidelity(in_teacher_space['patches'], raw['patches'])
    scalars[f'fidelity_cls/{alias}'] = _cosine_fidelity(in_teacher_space['cls'], raw['cls'])
  total = sum(weights[a] * terms[a] for a in terms)
  if cfg.preservation_weight:
    kb = targets[knowledge_base]
    own = {'cls': student['cls'],
           'patches': layers.resize_images(student['patches'], kb['patches'].shape[1:3])}
    preservation = _pair_distance(cfg.patch, own, kb, cfg)
    total = total + cfg.preservation_weight * preservation
    scalars['preservation'] = preservation
  scalars.update({f'loss/{a}': v for a, v in terms.items()})
  return total, scalars
