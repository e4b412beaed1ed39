"""RNN-T loss (Graves 2012) over a padded batch, in log space, fully vectorized.

The lattice has nodes (t, u), t in [0, T_b), u in [0, U_b], for an example with
T_b valid frames and U_b valid labels. From (t, u) a blank moves to (t + 1, u)
with log-probability blank(t, u) and label u moves to (t, u + 1) with
log-probability emit(t, u) = log p(labels[u] | t, u). The forward variable

  alpha(0, 0) = 0
  alpha(t, u) = logaddexp(alpha(t - 1, u) + blank(t - 1, u),
                          alpha(t, u - 1) + emit(t, u - 1))

gives the loss -log p(y | x) = -(alpha(T_b - 1, U_b) + blank(T_b - 1, U_b)).

All cells of one anti-diagonal n = t + u depend only on the previous diagonal,
so `jax.lax.scan` runs over the T + U diagonals of the padded lattice with a
vectorized update over u; the lattice inputs are "skewed" once (cell [n, u]
holds the value at t = n - u) with a gather. Cells off the lattice hold a large
finite negative number rather than -inf, so that gradients stay finite.
"""

import jax
import jax.numpy as jnp

Array = jax.Array

# log(0) stand-in: finite, so logaddexp of two such values has a finite
# gradient, and still far below any reachable log-probability.
_LOG_ZERO = -1e30


def _skew(values: Array, num_diagonals: int, first_u: int) -> Array:
  """Re-indexes lattice values by anti-diagonal.

  Args:
    values: [B, T, W] values at (t, u = first_u + w).
    num_diagonals: N, number of diagonals to produce.
    first_u: the u of column w = 0.

  Returns:
    [N, B, W] where [n, b, w] = values[b, n - (first_u + w), w], or _LOG_ZERO
    where that t lies outside [0, T).
  """
  num_time, width = values.shape[1], values.shape[2]
  n = jnp.arange(num_diagonals)[:, None]  # [N, 1]
  t = n - (first_u + jnp.arange(width))[None, :]  # [N, W]
  on_lattice = (t >= 0) & (t < num_time)
  t_safe = jnp.clip(t, 0, num_time - 1)
  gathered = values[:, t_safe, jnp.arange(width)[None, :]]  # [B, N, W]
  gathered = jnp.where(on_lattice[None], gathered, _LOG_ZERO)
  return jnp.transpose(gathered, (1, 0, 2))


def rnnt_loss(
    logits: Array,
    logit_paddings: Array,
    labels: Array,
    label_paddings: Array,
    blank_id: int = 0,
) -> Array:
  """Per-example RNN-T negative log-likelihood.

  Args:
    logits: float [B, T, U + 1, V] joint-network outputs (unnormalized).
    logit_paddings: float [B, T], 1.0 at padded frames (right-padded).
    labels: int [B, U] label ids in [0, V) (values at padded positions are
      ignored).
    label_paddings: float [B, U], 1.0 at padded labels (right-padded).
    blank_id: the blank's index in V.

  Returns:
    float32 [B], -log p(labels | logits) for each example, computed in float32
    (or float64 if `logits` is float64). An example with no valid frame gets
    loss 0.0 (and zero gradient), so fully padded examples are harmless.

  Raises:
    ValueError: on inconsistent shapes.
  """
  if logits.ndim != 4:
    raise ValueError(f"logits must be [B, T, U + 1, V]; got {logits.shape}.")
  batch_size, num_time, num_label_positions, _ = logits.shape
  num_labels = num_label_positions - 1
  if logit_paddings.shape != (batch_size, num_time):
    raise ValueError(
        f"logit_paddings must be [B, T] = {(batch_size, num_time)}; got"
        f" {logit_paddings.shape}."
    )
  if labels.shape != (batch_size, num_labels) or (
      label_paddings.shape != labels.shape
  ):
    raise ValueError(
        f"labels and label_paddings must be [B, U] = {(batch_size, num_labels)}"
        f" (U + 1 = logits.shape[2]); got {labels.shape} and"
        f" {label_paddings.shape}."
    )
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  logits = logits.astype(dtype)
  # log p(k) = logit(k) - logsumexp(logits); only the blank and label columns
  # are needed, so the full [B, T, U + 1, V] log-softmax is never stored.
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)  # [B, T, U + 1]
  blank = logits[..., blank_id] - log_normalizer  # [B, T, U + 1]
  safe_labels = jnp.where(label_paddings > 0, blank_id, labels)
  safe_labels = safe_labels.astype(jnp.int32)
  emit = (
      jnp.take_along_axis(
          logits[:, :, :num_labels, :], safe_labels[:, None, :, None], axis=-1
      )[..., 0]
      - log_normalizer[:, :, :num_labels]
  )  # [B, T, U]

  num_diagonals = num_time + num_labels
  # Step n consumes the blank of diagonal n - 1 at u and the emission of
  # diagonal n at u >= 1 (label u - 1 emitted at t = n - u).
  blank_skewed = _skew(blank, num_diagonals, first_u=0)  # [N, B, U + 1]
  emit_skewed = _skew(emit, num_diagonals, first_u=1)  # [N, B, U]
  u_index = jnp.arange(num_label_positions)

  def step(alpha_prev, inputs):
    n, blank_prev, emit_now = inputs
    from_below = alpha_prev + blank_prev  # blank from (t - 1, u).
    from_left = jnp.concatenate(
        [
            jnp.full((batch_size, 1), _LOG_ZERO, dtype),
            alpha_prev[:, :-1] + emit_now,
        ],
        axis=1,
    )  # label from (t, u - 1).
    alpha = jnp.logaddexp(from_below, from_left)
    t = n - u_index
    on_lattice = (t >= 0) & (t < num_time)
    alpha = jnp.where(on_lattice[None, :], alpha, _LOG_ZERO)
    return alpha, alpha

  alpha_0 = jnp.where(u_index[None, :] == 0, 0.0, _LOG_ZERO).astype(dtype)
  alpha_0 = jnp.broadcast_to(alpha_0, (batch_size, num_label_positions))
  _, alphas = jax.lax.scan(
      step,
      alpha_0,
      (jnp.arange(1, num_diagonals), blank_skewed[:-1], emit_skewed[1:]),
  )
  alphas = jnp.concatenate([alpha_0[None], alphas], axis=0)  # [N, B, U + 1]

  time_lengths = jnp.sum(1.0 - logit_paddings, axis=-1).astype(jnp.int32)
  label_lengths = jnp.sum(1.0 - label_paddings, axis=-1).astype(jnp.int32)
  last_t = jnp.maximum(time_lengths - 1, 0)
  batch_index = jnp.arange(batch_size)
  final_alpha = alphas[last_t + label_lengths, batch_index, label_lengths]
  final_blank = blank[batch_index, last_t, label_lengths]
  loss = -(final_alpha + final_blank)
  return jnp.where(time_lengths > 0, loss, 0.0)
