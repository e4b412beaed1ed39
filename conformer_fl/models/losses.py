"""The training loss: mean per-utterance loss over a padded batch."""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from conformer_fl.models import asr

PyTree = Any
# (params, model_state, batch, rng) -> (mean loss [], new model_state).
LossFn = Callable[[PyTree, PyTree, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, PyTree]]


def make_mean_loss_fn(model: asr.ConformerASR) -> LossFn:
  """`loss_fn(params, model_state, batch, rng) -> (mean loss, new_model_state)`.

  batch: 'audio' [B, S], 'audio_paddings' [B, S], 'labels' [B, U],
  'label_paddings' [B, U] and 'example_mask' [B] (1 = a real example). The
  mean of `asr.per_example_loss` is over the real examples of the batch; a
  batch with none has loss 0. new_model_state: model_state with what training
  updated (batch_stats of a batch-norm model). This is the function the
  federated round (conformer_fl/federated/fl_round.py) and the central step
  (conformer_fl/steps.py) differentiate.
  """

  def loss_fn(params, model_state, batch, rng):
    per_example, new_state = asr.per_example_loss(
        model, {"params": params, **model_state}, batch, train=True, rng=rng)
    mask = batch["example_mask"]
    loss = jnp.sum(jnp.where(mask > 0, per_example, 0.0)) / jnp.maximum(
        jnp.sum(mask), 1.0)
    return loss, {**model_state, **new_state}

  return loss_fn
