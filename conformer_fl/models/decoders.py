"""Decoders on top of the Conformer encoder: a CTC head and an RNN-T decoder.

* `CTCHead`: Dense from the encoder width to the vocabulary, [B, T, V].
* `RNNTDecoder`: prediction network (embedding + one-layer LSTM over
  [blank] + labels) and joint network (Dense(enc) + Dense(pred), tanh, Dense
  to the vocabulary), [B, T, U + 1, V]. Id 0 is the blank; the blank also
  starts the prediction network's input.
* `rnnt_greedy_decode`: a pure function over step functions, so that the
  search is one `jax.lax.scan` over frames and can be tested with a
  hand-made joint network.

Both decoders have one interface (`Decoder`), so that models/asr.py chooses
the decoder once, when it builds it, and never asks which one it has:
  __call__(encoded [B, T, D], labels [B, U]) -> logits (training forward);
  loss(logits, logit_paddings [B, T], labels [B, U], label_paddings [B, U])
    -> float32 [B], the negative log-likelihood of each transcript;
  decode(run, encoded [B, T, D], paddings [B, T]) -> (ids [B, L],
    id_paddings [B, L]), greedy, left-aligned, 0 (the blank) = padding.
`loss` and `decode` read no variables (`nn.nowrap`), so they run on the
unbound module; `decode` reaches the bound decoder's variables through
`run(method_name, *args)`, which applies one of its methods (the model's
`apply`), step by step for RNN-T.
"""

from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from conformer_fl.models import decoding
from conformer_fl.models import rnnt

Array = jax.Array
LSTMCarry = tuple[Array, Array]
# run(method_name, *args): a method of the bound decoder, applied.
RunMethod = Callable[..., Any]

BLANK_ID = 0


class Decoder(Protocol):
  """The interface of `CTCHead` and `RNNTDecoder` (module docstring)."""

  def __call__(self, encoded: Array, labels: Array) -> Array:
    ...

  def loss(self, logits: Array, logit_paddings: Array, labels: Array,
           label_paddings: Array) -> Array:
    ...

  def decode(self, run: RunMethod, encoded: Array,
             paddings: Array) -> tuple[Array, Array]:
    ...


class CTCHead(nn.Module):
  """Dense projection of encoder frames to CTC logits.

  Attributes:
    vocab_size: V, including the blank (id 0).
  """
  vocab_size: int

  @nn.compact
  def __call__(self, encoded: Array, labels: Array | None = None) -> Array:
    """[B, T, D] -> logits [B, T, V]; the labels are not read."""
    del labels  # CTC's logits do not depend on the transcript.
    return nn.Dense(self.vocab_size, name="logits")(encoded)

  @nn.nowrap
  def loss(self, logits: Array, logit_paddings: Array, labels: Array,
           label_paddings: Array) -> Array:
    """CTC loss: [B, T, V], [B, T], int32 [B, U], [B, U] -> float32 [B]."""
    return decoding.ctc_loss(logits, logit_paddings, labels, label_paddings,
                             blank_id=BLANK_ID)

  @nn.nowrap
  def decode(self, run: RunMethod, encoded: Array,
             paddings: Array) -> tuple[Array, Array]:
    """Best path: [B, T, D], [B, T] -> (ids int32 [B, T], paddings [B, T]).

    `decoding.ctc_greedy_decode` of the logits: repeats merged, blanks
    removed.
    """
    return decoding.ctc_greedy_decode(run("__call__", encoded), paddings,
                                      blank_id=BLANK_ID)


def _lstm_step(cell: nn.OptimizedLSTMCell, carry: LSTMCarry,
               inputs: Array) -> tuple[LSTMCarry, Array]:
  return cell(carry, inputs)


class RNNTDecoder(nn.Module):
  """RNN-T prediction and joint networks.

  Parameter tree: {'embedding', 'lstm', 'joint_encoder', 'joint_prediction',
  'joint_output'}. The same `lstm` cell runs over whole label sequences in
  training (`__call__`) and one token at a time in greedy decoding
  (`predict_step`). The LSTM's recurrent kernels are initialized LeCun-normal
  rather than orthogonal (see setup).

  Attributes:
    vocab_size: V, including the blank (id 0).
    embed_dim: Width of the label embedding.
    lstm_dim: Width of the one-layer LSTM (320 for S, 640 for M and L).
    joint_dim: Width of the joint network's hidden layer.
    max_symbols_per_step: Greedy decoding: most tokens emitted per frame.
  """
  vocab_size: int
  embed_dim: int
  lstm_dim: int
  joint_dim: int
  max_symbols_per_step: int = 4

  def setup(self):
    self.embedding = nn.Embed(self.vocab_size, self.embed_dim)
    # Not flax's default orthogonal recurrent init: its QR, batched when a
    # caller vmaps model.init over seeds, can deadlock jaxlib 0.10's LAPACK
    # kernel on a 2-thread CPU pool.
    self.lstm = nn.OptimizedLSTMCell(
        self.lstm_dim, recurrent_kernel_init=nn.initializers.lecun_normal())
    self.joint_encoder = nn.Dense(self.joint_dim)
    self.joint_prediction = nn.Dense(self.joint_dim, use_bias=False)
    self.joint_output = nn.Dense(self.vocab_size)

  def initial_carry(self, batch_size: int) -> LSTMCarry:
    """Zero LSTM state (c, h), each [B, lstm_dim]."""
    zeros = jnp.zeros((batch_size, self.lstm_dim), jnp.float32)
    return zeros, zeros

  def predict(self, labels: Array) -> Array:
    """Prediction network over [blank] + labels.

    Args:
      labels: int32 [B, U], 0 at padded positions.

    Returns:
      float32 [B, U + 1, lstm_dim]; position u has seen labels[:, :u].
    """
    batch = labels.shape[0]
    tokens = jnp.concatenate(
        [jnp.zeros((batch, 1), labels.dtype), labels], axis=1)
    scan_lstm = nn.scan(_lstm_step, variable_broadcast="params",
                        split_rngs={"params": False}, in_axes=1, out_axes=1)
    _, outputs = scan_lstm(self.lstm, self.initial_carry(batch),
                           self.embedding(tokens))
    return outputs

  def predict_step(self, carry: LSTMCarry,
                   tokens: Array) -> tuple[LSTMCarry, Array]:
    """One prediction-network step: carry, int32 [B] -> carry, [B, lstm_dim]."""
    return self.lstm(carry, self.embedding(tokens))

  def joint(self, encoded: Array, predicted: Array) -> Array:
    """Joint network with broadcasting.

    Args:
      encoded: [..., D] encoder frames.
      predicted: [..., lstm_dim] prediction-network outputs; the leading
        axes of both broadcast against each other.

    Returns:
      logits [broadcast leading axes..., V].
    """
    hidden = jnp.tanh(self.joint_encoder(encoded) +
                      self.joint_prediction(predicted))
    return self.joint_output(hidden)

  def __call__(self, encoded: Array, labels: Array) -> Array:
    """[B, T, D], int32 [B, U] -> logits [B, T, U + 1, V]."""
    predicted = self.predict(labels)  # [B, U + 1, P]
    return self.joint(encoded[:, :, None, :], predicted[:, None, :, :])

  @nn.nowrap
  def loss(self, logits: Array, logit_paddings: Array, labels: Array,
           label_paddings: Array) -> Array:
    """RNN-T loss (models/rnnt.py).

    [B, T, U + 1, V], [B, T], int32 [B, U], [B, U] -> float32 [B].
    """
    return rnnt.rnnt_loss(logits, logit_paddings, labels, label_paddings,
                          blank_id=BLANK_ID)

  @nn.nowrap
  def decode(self, run: RunMethod, encoded: Array,
             paddings: Array) -> tuple[Array, Array]:
    """Greedy RNN-T search (`rnnt_greedy_decode`).

    [B, T, D], [B, T] -> (ids int32 [B, L], paddings [B, L]) with
    L = T * max_symbols_per_step; each prediction and joint step is one
    `run` of `predict_step` / `joint`.
    """
    return rnnt_greedy_decode(
        lambda carry, tokens: run("predict_step", carry, tokens),
        lambda encoded, predicted: run("joint", encoded, predicted),
        run("initial_carry", encoded.shape[0]), encoded, paddings,
        self.max_symbols_per_step, blank_id=BLANK_ID)


def rnnt_greedy_decode(
    predict_step: Callable[[Any, Array], tuple[Any, Array]],
    joint: Callable[[Array, Array], Array],
    initial_carry: Any,
    encoded: Array,
    paddings: Array,
    max_symbols_per_step: int,
    blank_id: int = 0,
) -> tuple[Array, Array]:
  """Greedy RNN-T search, one `jax.lax.scan` over frames.

  At each valid frame the joint network is evaluated up to
  `max_symbols_per_step` times: while the argmax is not the blank, the token
  is emitted and the prediction network advances by that token; the first
  blank moves on to the next frame. Padded frames emit nothing. Every example
  carries its own state.

  Args:
    predict_step: (carry, tokens int32 [B]) -> (carry, outputs [B, P]).
    joint: (encoded [B, D], outputs [B, P]) -> logits [B, V].
    initial_carry: Prediction-network state before any token.
    encoded: [B, T, D] encoder frames.
    paddings: [B, T] 1.0 at padded frames.
    max_symbols_per_step: Most tokens emitted per frame (>= 1).
    blank_id: The blank's id.

  Returns:
    ids int32 [B, T * max_symbols_per_step], left-aligned, blank_id after the
    last emitted token; paddings float32 [B, T * max_symbols_per_step].
  """
  if max_symbols_per_step < 1:
    raise ValueError(
        f"max_symbols_per_step must be >= 1, got {max_symbols_per_step}.")
  batch, time = paddings.shape
  max_length = time * max_symbols_per_step
  batch_index = jnp.arange(batch)
  carry, outputs = predict_step(initial_carry,
                                jnp.full((batch,), blank_id, jnp.int32))

  def frame_step(state, frame):
    carry, outputs, ids, length = state
    encoded_t, padding_t = frame
    active = padding_t < 0.5  # [B]: still emitting at this frame.
    for _ in range(max_symbols_per_step):  # static and small.
      token = jnp.argmax(joint(encoded_t, outputs), axis=-1).astype(jnp.int32)
      emit = active & (token != blank_id)
      # Writes at index max_length are dropped.
      ids = ids.at[batch_index, jnp.where(emit, length, max_length)].set(
          token, mode="drop")
      length = length + emit.astype(jnp.int32)
      new_carry, new_outputs = predict_step(carry, token)
      keep = lambda new, old: jnp.where(
          emit.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
      carry = jax.tree.map(keep, new_carry, carry)
      outputs = keep(new_outputs, outputs)
      active = emit
    return (carry, outputs, ids, length), None

  state = (carry, outputs, jnp.full((batch, max_length), blank_id, jnp.int32),
           jnp.zeros((batch,), jnp.int32))
  (_, _, ids, length), _ = jax.lax.scan(
      frame_step, state,
      (jnp.swapaxes(encoded, 0, 1), jnp.swapaxes(paddings, 0, 1)))
  id_paddings = (jnp.arange(max_length)[None, :] >= length[:, None]).astype(
      jnp.float32)
  return ids, id_paddings
