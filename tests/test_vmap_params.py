"""vmap over parameter sets, depthwise-conv parity, RNN-T greedy decoding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conformer_fl import models
from conformer_fl.models import conformer
from conformer_fl.models import decoders

NUM_SETS = 3


def _batch(seed: int, vocab_size: int, samples: int = 6400,
           num_labels: int = 4):
  rng = np.random.default_rng(seed)
  audio_paddings = np.zeros((2, samples), np.float32)
  audio_paddings[1, samples // 2 + 37 * seed:] = 1.0
  labels = rng.integers(1, vocab_size, (2, num_labels)).astype(np.int32)
  labels[1, num_labels - 1:] = 0
  return {
      "audio": rng.uniform(-0.5, 0.5, (2, samples)).astype(np.float32),
      "audio_paddings": audio_paddings,
      "labels": labels,
      "label_paddings": (labels == 0).astype(np.float32),
  }


def _init(model, batch, seeds):
  """Variables for each seed, stacked on a leading axis (one compile).

  Not jax.vmap(init): a batched QR (the LSTM's orthogonal init) can deadlock
  jaxlib 0.10's LAPACK kernel on a 2-thread pool.
  """
  init = jax.jit(lambda rng: model.init(
      rng, batch["audio"], batch["audio_paddings"], batch["labels"],
      batch["label_paddings"], train=False))
  variables = [init(jax.random.key(seed)) for seed in seeds]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *variables)


def test_vmap_over_parameter_sets_equals_loop():
  # Batch norm in train mode: loss and new batch statistics per set. CTC
  # keeps the compile short; the RNN-T decoder is vmapped in the benchmark.
  config = models.get_model_config("tiny", decoder="ctc", num_blocks=1)
  model = models.build_model(config)
  batches = [_batch(seed, config.vocab_size) for seed in range(NUM_SETS)]
  # Parameter sets filled from numpy: no init compile, clearly distinct sets.
  shapes = jax.eval_shape(lambda rng: model.init(
      rng, batches[0]["audio"], batches[0]["audio_paddings"],
      batches[0]["labels"], batches[0]["label_paddings"], train=False),
                          jax.random.key(0))
  rng = np.random.default_rng(0)
  stacked_variables = jax.tree.map(
      lambda s: jnp.asarray(np.abs(rng.normal(0.0, 0.3, (NUM_SETS,) + s.shape))
                            + 0.5 if s.ndim == 1 else
                            rng.normal(0.0, 0.3, (NUM_SETS,) + s.shape),
                            jnp.float32), shapes)
  variables = [jax.tree.map(lambda x, i=i: x[i], stacked_variables)
               for i in range(NUM_SETS)]
  rngs = jax.random.split(jax.random.key(7), NUM_SETS)
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

  def loss_fn(variables, batch, rng):
    return models.per_example_loss(model, variables, batch, train=True,
                                   rng=rng)

  single = jax.jit(loss_fn)
  looped = [single(v, b, r) for v, b, r in zip(variables, batches, rngs)]
  mapped_loss, mapped_state = jax.jit(jax.vmap(loss_fn))(
      stacked_variables, stack(batches), rngs)
  for i, (loss, state) in enumerate(looped):
    np.testing.assert_allclose(mapped_loss[i], loss, rtol=2e-5)
    jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(
        a[i], b, rtol=1e-4, atol=1e-6), mapped_state, state)
  # The sets really differ (a broadcast bug would give equal rows).
  assert not np.allclose(mapped_loss[0], mapped_loss[1])


@pytest.mark.parametrize("kernel_size", [8, 15])
def test_shift_add_depthwise_equals_grouped_conv(kernel_size):
  rng = np.random.default_rng(kernel_size)
  x = jnp.asarray(rng.normal(size=(3, 21, 12)), jnp.float32)
  shift_add = conformer.DepthwiseConv1D(kernel_size, "shift_add")
  variables = shift_add.init(jax.random.key(0), x)
  reference = nn.Conv(12, (kernel_size,), feature_group_count=12,
                      use_bias=False, padding="SAME")
  # Both read the same [K, 1, D] kernel as nn.Conv's depthwise kernel.
  assert (jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, reference.init(jax.random.key(0), x)))
  expected = reference.apply(variables, x)
  np.testing.assert_allclose(shift_add.apply(variables, x), expected,
                             atol=1e-5)
  np.testing.assert_allclose(
      conformer.DepthwiseConv1D(kernel_size, "conv").apply(variables, x),
      expected, atol=1e-5)
  # One tap by hand: output t of channel c = sum_k x[t + k - (K-1)//2] w[k].
  kernel = np.asarray(variables["params"]["kernel"])[:, 0, :]
  padded = np.pad(np.asarray(x), ((0, 0), ((kernel_size - 1) // 2,
                                           kernel_size // 2), (0, 0)))
  by_hand = sum(padded[:, k:k + 21] * kernel[k] for k in range(kernel_size))
  np.testing.assert_allclose(expected, by_hand, atol=1e-5)


def test_bad_depthwise_impl_is_named():
  with pytest.raises(ValueError, match="fft"):
    conformer.DepthwiseConv1D(4, "fft").init(jax.random.key(0),
                                             jnp.zeros((1, 5, 2)))


def _scripted_greedy(script, paddings, max_symbols):
  """Greedy decode where the joint's argmax is read from a script.

  script[b, t, c] is the token the joint prefers at frame t after c emitted
  tokens (0 = blank). The prediction state is the count of emitted tokens.
  """
  vocab = 5
  predict_step = lambda count, tokens: (count + 1, (count + 1)[:, None])
  def joint(frame_script, count):
    token = jnp.take_along_axis(frame_script, count, axis=-1)[:, 0]
    return 10.0 * jax.nn.one_hot(token, vocab)
  return decoders.rnnt_greedy_decode(
      predict_step, joint, jnp.full((script.shape[0],), -1, jnp.int32),
      jnp.asarray(script), jnp.asarray(paddings), max_symbols)


def test_rnnt_greedy_decode_hand_constructed():
  script = np.zeros((2, 4, 8), np.int32)
  # Example 0: t0 emits 3; t1 nothing; t2 emits 1, 2; t3 wants 4, 4, 4 but
  # at most 2 per frame are allowed.
  script[0, 0, 0] = 3
  script[0, 2, 1], script[0, 2, 2] = 1, 2
  script[0, 3, 3:6] = 4
  # Example 1: t0 nothing; t1 emits 2; t2 wants 3, 3, 3 (capped at 2);
  # t3 is padded: its 1 must not be emitted.
  script[1, 1, 0] = 2
  script[1, 2, 1:4] = 3
  script[1, 3, 3] = 1
  paddings = np.array([[0, 0, 0, 0], [0, 0, 0, 1]], np.float32)
  ids, id_paddings = jax.jit(_scripted_greedy, static_argnums=2)(
      script, paddings, 2)
  np.testing.assert_array_equal(
      ids, [[3, 1, 2, 4, 4, 0, 0, 0], [2, 3, 3, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(id_paddings.sum(axis=1), [3, 5])
  # With one symbol per frame, t2 of example 0 emits only its 1.
  ids, _ = _scripted_greedy(script, paddings, 1)
  np.testing.assert_array_equal(ids[0], [3, 1, 0, 0])


def _numpy_greedy_walk(lattice, num_frames, max_symbols):
  """Greedy path through a teacher-forced lattice [T, U + 1, V]."""
  emitted = []
  for t in range(num_frames):
    for _ in range(max_symbols):
      token = int(np.argmax(lattice[t, len(emitted)]))
      if token == 0:
        break
      emitted.append(token)
  return emitted


def test_rnnt_greedy_decode_follows_the_models_lattice():
  config = models.get_model_config("tiny", decoder="rnnt", num_blocks=1,
                                   max_symbols_per_step=2)
  model = models.build_model(config)
  batch = _batch(3, config.vocab_size)
  variables = jax.tree.map(lambda x: x[0], _init(model, batch, [0]))
  # Surgery: a blank bias that makes the search mix blanks and emissions.
  params = jax.tree.map(np.array, variables["params"])
  params["decoder"]["joint_output"]["bias"][0] += 1.5
  variables = {**variables, "params": params}
  ids, id_paddings = jax.jit(
      lambda v, b: models.greedy_decode(model, v, b))(variables, batch)
  ids, lengths = np.asarray(ids), (1 - np.asarray(id_paddings)).sum(1)
  # Teacher-force the decoded ids through the full (scanned) prediction net.
  outputs = jax.jit(lambda v, b: model.apply(
      v, b["audio"], b["audio_paddings"], jnp.asarray(ids),
      (ids == 0).astype(np.float32), train=False))(variables, batch)
  num_frames = (1 - np.asarray(outputs["logit_paddings"])).sum(1).astype(int)
  for b in range(2):
    walk = _numpy_greedy_walk(np.asarray(outputs["logits"][b]),
                              num_frames[b], config.max_symbols_per_step)
    assert walk == list(ids[b, :int(lengths[b])])
    assert np.all(ids[b, int(lengths[b]):] == 0)
    # Non-trivial: some frames emit, others do not reach the cap.
    assert 0 < len(walk) < num_frames[b] * config.max_symbols_per_step


@pytest.mark.parametrize("shape", [(2, 37, 80, 1), (3, 10, 41, 5)])
def test_strided_conv_equals_nn_conv(shape):
  """The im2col subsampling conv: same init and outputs as nn.Conv."""
  x = jax.random.normal(jax.random.key(1), shape)
  reference = nn.Conv(7, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  strided = conformer.StridedConv3x3(7)
  ref_vars = reference.init(jax.random.key(0), x)
  vars_ = strided.init(jax.random.key(0), x)
  np.testing.assert_array_equal(vars_["params"]["kernel"],
                                ref_vars["params"]["kernel"])
  np.testing.assert_allclose(strided.apply(ref_vars, x),
                             reference.apply(ref_vars, x), atol=1e-5)
