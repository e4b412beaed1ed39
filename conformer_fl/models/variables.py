"""A model's variables: initialized from a seed, split into params and state."""

from typing import Any

import flax
import jax
import jax.numpy as jnp

from conformer_fl.models import asr

PyTree = Any


def init_variables(model: asr.ConformerASR, seed: int) -> dict[str, PyTree]:
  """The model's initial variables {'params': ..., ['batch_stats': ...]}.

  Initialized on a dummy batch (one 1 s utterance [1, 16000], 8 labels [1, 8]);
  the variables' shapes do not depend on it. The same seed gives the same
  values, bit for bit.
  """
  audio = jnp.zeros((1, 16000), jnp.float32)
  labels = jnp.ones((1, 8), jnp.int32)
  init = jax.jit(lambda rng: model.init(
      rng, audio, jnp.zeros_like(audio), labels, jnp.zeros(labels.shape),
      train=False))
  return flax.core.unfreeze(init(jax.random.key(seed)))


def split_variables(variables: dict[str, PyTree]) -> tuple[PyTree, PyTree]:
  """(params, model_state): model_state holds the rest, e.g. batch_stats."""
  variables = dict(variables)
  return variables.pop("params"), variables
