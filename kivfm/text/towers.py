"""Text towers of CLIP and SigLIP as one NNX transformer, and their weights from Hugging Face
state dicts (numpy, `text_model.*` with CLIP's `text_projection.weight` or SigLIP's
`text_model.head.*`).

CLIP: causal self-attention, quick-GELU, the embedding of the first end-of-text token, linear
projection without bias. SigLIP: bidirectional, tanh-GELU, the last position, projection with
bias. Both: pre-LayerNorm blocks, learned absolute positions, a final LayerNorm.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ACTIVATIONS = {'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
               'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True)}


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab: int
  width: int
  depth: int
  heads: int
  mlp: int
  context: int
  proj_dim: int
  act: str = 'quick_gelu'
  eps: float = 1e-5
  causal: bool = True               # CLIP; SigLIP attends both ways
  end_token: int | None = 49407     # pool at its first occurrence (CLIP); None: last position
  proj_bias: bool = False
  lowercase: bool = False           # SigLIP2 was trained on lower-cased text


def clip_text(width: int, heads: int, proj_dim: int) -> TextConfig:
  """An OpenAI CLIP text tower (12 layers, 77 tokens, 49,408-token vocabulary)."""
  return TextConfig(vocab=49408, width=width, depth=12, heads=heads, mlp=4 * width, context=77,
                    proj_dim=proj_dim)


class Block(nnx.Module):
  def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
    w = cfg.width
    self.norm1 = nnx.LayerNorm(w, epsilon=cfg.eps, rngs=rngs)
    self.q, self.k, self.v, self.out = (nnx.Linear(w, w, rngs=rngs) for _ in range(4))
    self.norm2 = nnx.LayerNorm(w, epsilon=cfg.eps, rngs=rngs)
    self.fc1 = nnx.Linear(w, cfg.mlp, rngs=rngs)
    self.fc2 = nnx.Linear(cfg.mlp, w, rngs=rngs)
    self.heads, self.causal, self.act = cfg.heads, cfg.causal, ACTIVATIONS[cfg.act]

  def __call__(self, x):
    b, n, w = x.shape
    split = lambda t: t.reshape(b, n, self.heads, w // self.heads)
    h = self.norm1(x)
    q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
    mask = jnp.tril(jnp.ones((n, n), bool)) if self.causal else None
    attended = jax.nn.dot_product_attention(q, k, v, mask=mask)
    x = x + self.out(attended.reshape(b, n, w))
    return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TextTower(nnx.Module):
  """int token ids [N, context] -> text embeddings [N, proj_dim] (not normalised)."""

  def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.token_embed = nnx.Embed(cfg.vocab, cfg.width, rngs=rngs)
    self.pos_embed = nnx.Param(jnp.zeros((cfg.context, cfg.width)))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.depth)])
    self.final_norm = nnx.LayerNorm(cfg.width, epsilon=cfg.eps, rngs=rngs)
    self.proj = nnx.Linear(cfg.width, cfg.proj_dim, use_bias=cfg.proj_bias, rngs=rngs)

  def __call__(self, ids):
    ids = jnp.asarray(ids, jnp.int32)
    x = self.token_embed(ids) + self.pos_embed[:ids.shape[1]]
    for block in self.blocks:
      x = block(x)
    x = self.final_norm(x)
    if self.cfg.end_token is None:
      pooled = x[:, -1]
    else:
      pooled = x[jnp.arange(len(ids)), jnp.argmax(ids == self.cfg.end_token, axis=1)]
    return self.proj(pooled)


def port_hf(cfg: TextConfig, state: dict) -> TextTower:
  """A TextTower holding a Hugging Face CLIP / SigLIP model's text weights (numpy arrays by
  name, of the whole model or of its text model alone; a missing or mis-shaped tensor raises,
  naming it)."""
  tower = nnx.eval_shape(lambda: TextTower(cfg, nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(tower))

  def take(name, shape, transpose=False):
    if name not in state:
      raise KeyError(f'text tower weight {name!r} is missing from the state dict')
    x = np.asarray(state[name], np.float32)
    x = x.T if transpose else x
    if x.shape != tuple(shape):
      raise ValueError(f'text tower weight {name!r} has shape {x.shape}, expected {shape}')
    return jnp.asarray(x)

  def linear(dst, src, module):
    dst['kernel'] = take(f'{src}.weight', module['kernel'].shape, transpose=True)
    if 'bias' in module:
      dst['bias'] = take(f'{src}.bias', module['bias'].shape)

  def norm(dst, src):
    dst['scale'] = take(f'{src}.weight', dst['scale'].shape)
    dst['bias'] = take(f'{src}.bias', dst['bias'].shape)

  t = 'text_model.' if 'text_model.embeddings.token_embedding.weight' in state else ''
  params['token_embed']['embedding'] = take(t + 'embeddings.token_embedding.weight',
                                            params['token_embed']['embedding'].shape)
  params['pos_embed'] = take(t + 'embeddings.position_embedding.weight', params['pos_embed'].shape)
  for i, block in params['blocks'].items():
    s = f'{t}encoder.layers.{i}.'
    for ours, theirs in (('q', 'q_proj'), ('k', 'k_proj'), ('v', 'v_proj'), ('out', 'out_proj')):
      linear(block[ours], s + 'self_attn.' + theirs, block[ours])
    linear(block['fc1'], s + 'mlp.fc1', block['fc1'])
    linear(block['fc2'], s + 'mlp.fc2', block['fc2'])
    norm(block['norm1'], s + 'layer_norm1')
    norm(block['norm2'], s + 'layer_norm2')
  norm(params['final_norm'], t + 'final_layer_norm')
  linear(params['proj'], 'text_projection' if 'text_projection.weight' in state else t + 'head',
         params['proj'])
  graphdef, _ = nnx.split(tower)
  return nnx.merge(graphdef, nnx.State(params))
