"""CTC greedy decoding and the CTC loss, over padded batches.

RNN-T greedy decoding needs the prediction network, so it lives with the model.
"""

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def ctc_greedy_decode(
    logits: Array, paddings: Array, blank_id: int = 0
) -> tuple[Array, Array]:
  """Best-path CTC decoding: argmax per frame, collapse repeats, drop blanks.

  Repeats are collapsed before blanks are removed, so "a a _ a" decodes to
  "a a". Padded frames never emit.

  Args:
    logits: float [B, T, V] (log-)probabilities or logits.
    paddings: float [B, T], 1.0 at padded frames (right-padded).
    blank_id: the blank's index in V.

  Returns:
    (ids int32 [B, T], id_paddings float32 [B, T]): the decoded ids
    left-aligned, 0 after the last one, and paddings 1.0 from the first unused
    position on.
  """
  if logits.ndim != 3 or paddings.shape != logits.shape[:2]:
    raise ValueError(
        "ctc_greedy_decode expects logits [B, T, V] and paddings [B, T]; got"
        f" logits {logits.shape} and paddings {paddings.shape}."
    )
  batch_size, num_time, _ = logits.shape
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, T]
  previous = jnp.concatenate(
      [jnp.full((batch_size, 1), -1, jnp.int32), best[:, :-1]], axis=1
  )
  keep = (paddings == 0) & (best != blank_id) & (best != previous)
  positions = jnp.cumsum(keep, axis=1) - 1  # target slot of each kept id.
  positions = jnp.where(keep, positions, num_time)  # out of range: dropped.
  batch_index = jnp.broadcast_to(jnp.arange(batch_size)[:, None], best.shape)
  ids = (
      jnp.zeros_like(best)
      .at[batch_index, positions]
      .set(best, mode="drop", unique_indices=False)
  )
  counts = jnp.sum(keep, axis=1)  # [B]
  id_paddings = (jnp.arange(num_time)[None, :] >= counts[:, None]).astype(
      jnp.float32
  )
  return ids, id_paddings


def ctc_loss(
    logits: Array,
    logit_paddings: Array,
    labels: Array,
    label_paddings: Array,
    blank_id: int = 0,
) -> Array:
  """Per-example CTC negative log-likelihood (a thin wrapper of optax.ctc_loss).

  Args:
    logits: float [B, T, V] unnormalized scores.
    logit_paddings: float [B, T], 1.0 at padded frames (right-padded).
    labels: int [B, U] label ids.
    label_paddings: float [B, U], 1.0 at padded labels (right-padded).
    blank_id: the blank's index in V.

  Returns:
    float32 [B] losses. Examples whose labels cannot be aligned in the valid
    frames get a very large finite loss (optax uses log(0) ~= -1e5).
  """
  if logits.ndim != 3 or logit_paddings.shape != logits.shape[:2]:
    raise ValueError(
        "ctc_loss expects logits [B, T, V] and logit_paddings [B, T]; got"
        f" {logits.shape} and {logit_paddings.shape}."
    )
  if labels.shape != label_paddings.shape or labels.shape[0] != logits.shape[0]:
    raise ValueError(
        "ctc_loss expects labels and label_paddings [B, U] with the batch of"
        f" logits; got {labels.shape} and {label_paddings.shape}."
    )
  return optax.ctc_loss(
      logits.astype(jnp.float32),
      logit_paddings.astype(jnp.float32),
      labels.astype(jnp.int32),
      label_paddings.astype(jnp.float32),
      blank_id=blank_id,
  )
