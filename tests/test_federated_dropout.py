"""Federated dropout: sub-model gather/scatter, count-normalized averaging.

Conformer tests use a 1-block tiny model (eager forward passes; one compiled
client step per dropout rate for the FLOP count). Round tests use a toy
two-layer linear model whose 4 hidden units are dropped, so that every number
can be computed by hand in numpy, on a 1-device mesh (2 clients).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conformer_fl import models
from conformer_fl import tree_paths
from conformer_fl.federated import dropout
from conformer_fl.federated import fl_round as round_lib
from conformer_fl.federated import mesh as mesh_lib
from conformer_fl.federated import submodel as submodel_lib
from conformer_fl.models.losses import make_mean_loss_fn

BATCH, SAMPLES, LABELS = 2, 3200, 2
D_MODEL, GROUPS = 32, 2
# The models' declarations of their droppable modules (group norm, other).
GROUPED = models.droppable_modules(conv_norm_groups=GROUPS)
UNGROUPED = models.droppable_modules()


def _tiny_config(norm):
  """The tiny 1-block model's config; group norm has GROUPS groups."""
  groups = dict(conv_norm_groups=GROUPS) if norm == "group_norm" else {}
  return models.get_model_config(
      "tiny", num_blocks=1, conv_norm=norm, decoder="ctc", conv_kernel_size=3,
      dropout_rate=0.0, **groups)


def _submodel(norm, spec, rescale=False):
  """The tiny model at the widths of `spec` (the model side's sub-model)."""
  return models.build_model(_tiny_config(norm), kept_units=spec.kept_units,
                            rescale_kept=rescale)


def _model_and_variables():
  """The tiny 1-block model with random (not init) values, no compilation.

  Shapes come from jax.eval_shape(model.init); values are drawn in numpy, so
  norm scales, biases and the batch-norm running statistics are non-trivial.
  The group-norm and batch-norm models share the params tree; the batch-norm
  one adds 'batch_stats' {'mean', 'var'} [C] under each conv_norm.
  """
  model = models.build_model(_tiny_config("group_norm"))
  rng = np.random.default_rng(0)
  batch = {
      "audio": (0.1 * rng.normal(size=(BATCH, SAMPLES))).astype(np.float32),
      "audio_paddings": np.zeros((BATCH, SAMPLES), np.float32),
      "labels": np.array([[1, 2], [3, 0]], np.int32),
      "label_paddings": np.array([[0, 0], [0, 1]], np.float32),
      "example_mask": np.ones((BATCH,), np.float32),
  }
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), batch["audio"],
                         batch["audio_paddings"], batch["labels"],
                         batch["label_paddings"], train=False))
  params = jax.tree.map(
      lambda x: (rng.normal(size=x.shape) / np.sqrt(max(x.shape[0], 1))
                 ).astype(np.float32) if x.ndim else np.float32(0.1),
      shapes["params"])
  batch_norm_model = models.build_model(_tiny_config("batch_norm"))
  batch_stats = {"encoder": {"block_00": {"conv": {"conv_norm": {
      "mean": rng.normal(size=D_MODEL).astype(np.float32),
      "var": (0.5 + rng.random(D_MODEL)).astype(np.float32)}}}}}
  return {"group_norm": (model, {"params": params}, batch),
          "batch_norm": (batch_norm_model, {"params": params,
                                            "batch_stats": batch_stats},
                         batch)}


@pytest.fixture(scope="module")
def tiny_models():
  return _model_and_variables()


@pytest.fixture(scope="module")
def group_norm_model(tiny_models):
  return tiny_models["group_norm"]


@pytest.fixture(scope="module")
def batch_norm_model(tiny_models):
  return tiny_models["batch_norm"]


def _state(variables):
  return {k: v for k, v in variables.items() if k != "params"}


# ----------------------------------------------------------------------------
# Conformer sub-models.
# ----------------------------------------------------------------------------


def test_gather_scatter_round_trip(group_norm_model):
  _, variables, _ = group_norm_model
  params = variables["params"]
  spec = dropout.make_dropout_spec(params, default_rate=0.5,
                                   droppable=GROUPED)
  kinds = {layer.name.split("/")[-1]: layer for layer in spec.layers}
  assert (kinds["ffn1"].num_kept, kinds["conv"].num_kept,
          kinds["mhsa"].num_kept) == (64, 16, 1)

  @jax.jit
  def extract_and_scatter_back(params, rng):
    kept = submodel_lib.sample_kept_indices(spec, rng)
    sub = submodel_lib.gather_submodel(spec, params, kept)
    zeros = jax.tree.map(jnp.zeros_like, params)
    return kept, sub, submodel_lib.scatter_to_full(spec, sub, zeros, kept)

  kept, sub, back = extract_and_scatter_back(params, jax.random.key(3))
  block, sub_block = (params["encoder"]["block_00"],
                      sub["encoder"]["block_00"])
  ffn_kept = np.asarray(kept["encoder/block_00/ffn1"])
  np.testing.assert_array_equal(
      sub_block["ffn1"]["dense_in"]["kernel"],
      block["ffn1"]["dense_in"]["kernel"][:, ffn_kept])
  np.testing.assert_array_equal(sub_block["ffn1"]["dense_out"]["kernel"],
                                block["ffn1"]["dense_out"]["kernel"][ffn_kept])
  conv_kept = np.asarray(kept["encoder/block_00/conv"])
  glu_columns = np.concatenate([conv_kept, conv_kept + D_MODEL])
  np.testing.assert_array_equal(
      sub_block["conv"]["pointwise_in"]["kernel"],
      block["conv"]["pointwise_in"]["kernel"][:, glu_columns])
  np.testing.assert_array_equal(
      sub_block["conv"]["depthwise"]["kernel"],
      block["conv"]["depthwise"]["kernel"][:, :, conv_kept])
  head = int(kept["encoder/block_00/mhsa"][0])
  np.testing.assert_array_equal(sub_block["mhsa"]["output"]["kernel"][0],
                                block["mhsa"]["output"]["kernel"][head])
  # Scattered back into zeros: originals at kept positions, zero elsewhere.
  weights = submodel_lib.trained_weights(
      spec, params, submodel_lib.kept_indicator(spec, kept))
  for path, weight in weights.items():
    original = tree_paths.get(params, path)
    np.testing.assert_array_equal(
        tree_paths.get(back, path),
        np.where(np.asarray(weight) > 0, original, 0.0))
    assert 0 < np.mean(np.asarray(weight)) < 1
  # Leaves outside dropped layers pass through untouched.
  np.testing.assert_array_equal(back["encoder"]["subsampling"]["projection"][
      "kernel"], params["encoder"]["subsampling"]["projection"]["kernel"])


def test_group_norm_channels_dropped_within_groups(group_norm_model):
  _, variables, _ = group_norm_model
  spec = dropout.make_dropout_spec(variables["params"], default_rate=0.25,
                                   unit_kinds=("conv",),
                                   droppable=GROUPED)
  (layer,) = spec.layers
  assert (layer.num_kept, layer.num_groups) == (24, GROUPS)
  kept = np.asarray(submodel_lib.sample_kept_indices(
      spec, jax.random.key(1))[layer.name])
  group_of = kept // (D_MODEL // GROUPS)
  np.testing.assert_array_equal(group_of, np.repeat(np.arange(GROUPS), 12))
  assert len(set(kept)) == 24 and np.all(np.diff(kept) > 0)


@pytest.mark.parametrize("rescale", [False, True])
def test_sub_model_equals_full_model_with_dropped_units_zeroed(
    batch_norm_model, rescale):
  """Eval mode: a sub-model = the full model whose dropped units output 0.

  With batch norm in eval mode every conv channel is independent, so this
  holds for FFN hidden units, conv channels (incl. running statistics, which
  live in model_state) and heads alike. With `rescale` (inverted dropout)
  the kept units' rows of the output projection are, in the reference,
  multiplied by n / k.
  """
  model, variables, batch = batch_norm_model
  params, state = variables["params"], _state(variables)
  spec = dropout.make_dropout_spec(params, state, droppable=UNGROUPED,
                                   default_rate=0.5)
  kept = submodel_lib.sample_kept_indices(spec, jax.random.key(7))
  sub_variables = {
      "params": submodel_lib.gather_submodel(spec, params, kept),
      **submodel_lib.gather_submodel(spec, state, kept, "model_state")}
  indicator = {k: np.asarray(v) for k, v in
               submodel_lib.kept_indicator(spec, kept).items()}
  if rescale:
    indicator = {k: v * (v.size / v.sum()) for k, v in indicator.items()}
  block = jax.tree.map(np.array, params["encoder"]["block_00"])
  for name in ("ffn1", "ffn2"):
    block[name]["dense_out"]["kernel"] *= indicator[
        f"encoder/block_00/{name}"][:, None]
  block["conv"]["pointwise_out"]["kernel"] *= indicator[
      "encoder/block_00/conv"][:, None]
  block["mhsa"]["output"]["kernel"] *= indicator["encoder/block_00/mhsa"][
      :, None, None]
  masked = {"params": {**params, "encoder": {**params["encoder"],
                                             "block_00": block}}, **state}
  inputs = (batch["audio"], batch["audio_paddings"], batch["labels"],
            batch["label_paddings"])
  encode = lambda m, v: m.apply(v, *inputs, train=False)["encoded"]
  sub_model = _submodel("batch_norm", spec, rescale)
  expected, got = jax.jit(lambda a, b: (encode(model, a),
                                        encode(sub_model, b)))(
                                            masked, sub_variables)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  assert float(np.std(np.asarray(got))) > 0.1


def test_kept_indices_deterministic_and_layout_independent(group_norm_model):
  _, variables, _ = group_norm_model
  spec = dropout.make_dropout_spec(variables["params"], default_rate=0.5,
                                   droppable=GROUPED)
  rngs = jax.random.split(jax.random.key(11), 3)
  sample = jax.jit(lambda r: submodel_lib.sample_kept_indices(spec, r))
  vmapped = jax.jit(jax.vmap(sample))(rngs)
  for client in range(3):
    again = sample(rngs[client])
    for name, indices in again.items():
      np.testing.assert_array_equal(vmapped[name][client], indices)
  ffn = vmapped["encoder/block_00/ffn1"]
  assert not np.array_equal(ffn[0], ffn[1])


def test_client_flops_fall_with_kept_fraction(group_norm_model):
  """Parameters and FLOPs saved = those of the dropped units.

  FLOPs (forward) per frame of one FFN hidden unit: 2D (dense_in) + 2D
  (dense_out); of one conv channel: 4D (two GLU columns) + 2K (depthwise) +
  2D (pointwise_out). The step (forward, backward, SGD) costs about 3x the
  forward matmuls, plus elementwise work, which also scales with the units.
  """
  model, variables, batch = group_norm_model
  params = variables["params"]
  inputs = (batch["audio"], batch["audio_paddings"], batch["labels"],
            batch["label_paddings"])
  frames = jax.eval_shape(lambda v: model.apply(v, *inputs, train=False),
                          variables)["encoded"].shape[1]
  costs = {}
  for rate in (0.0, 0.5):
    spec = dropout.make_dropout_spec(params, default_rate=rate,
                                     unit_kinds=("ffn", "conv"),
                                     droppable=GROUPED)
    costs[rate] = dropout.client_step_cost(
        make_mean_loss_fn(_submodel("group_norm", spec)), optax.sgd(0.1),
        spec, params, {}, batch, jax.random.key(0))
  dropped_hidden, dropped_channels, kernel = 2 * 64, 16, 3
  # Parameters: per hidden unit 2D + 1; per channel 2D + 2 (GLU columns and
  # biases) + K + 2 (group-norm scale, bias) + D (pointwise_out row).
  assert costs[0.0]["params"] - costs[0.5]["params"] == (
      dropped_hidden * (2 * D_MODEL + 1) +
      dropped_channels * (3 * D_MODEL + kernel + 4))
  forward_flops = BATCH * frames * (
      dropped_hidden * 4 * D_MODEL +
      dropped_channels * (6 * D_MODEL + 2 * kernel))
  saved = costs[0.0]["flops"] - costs[0.5]["flops"]
  assert 3.0 * forward_flops < saved < 4.5 * forward_flops
  assert costs[0.5]["peak_bytes"] < costs[0.0]["peak_bytes"]


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------


def _dropout_config(**fields):
  config = dict(kind="none", rates={}, default_rate=0.0,
                unit_kinds=("ffn", "conv", "mhsa"), freeze_units=())
  config.update(fields)
  return ml_collections.ConfigDict(config)


def test_spec_from_config_and_rates(group_norm_model):
  _, variables, _ = group_norm_model
  params = variables["params"]
  model_config = models.get_model_config("tiny", num_blocks=1,
                                         conv_norm="group_norm",
                                         conv_norm_groups=GROUPS)
  for config in (_dropout_config(), _dropout_config(kind="uniform")):
    assert dropout.dropout_spec_from_config(
        config, params, {},
        models.droppable_modules_from_config(model_config)) is None
  spec = dropout.dropout_spec_from_config(
      _dropout_config(kind="targeted", default_rate=0.5,
                      rates={"encoder/block_00": 0.25,
                             "encoder/block_00/ffn2": 0.0}),
      params, {}, models.droppable_modules_from_config(model_config))
  kept = {layer.name: layer.num_kept for layer in spec.layers}
  assert kept == {"encoder/block_00/ffn1": 96, "encoder/block_00/conv": 24}
  with pytest.raises(ValueError, match="no unit"):
    dropout.make_dropout_spec(params, droppable=GROUPED,
                              rates={"encoder/block_07": 0.5})
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    dropout.make_dropout_spec(params, droppable=GROUPED, default_rate=1.0)


def test_rates_and_frozen_units_by_pattern(group_norm_model):
  """Rate keys and freeze_units are patterns; the most specific rate wins."""
  params = group_norm_model[1]["params"]
  rates = {"*/conv": 0.5, "encoder/block_00/*": 0.25}
  for ordered in (rates, dict(reversed(rates.items()))):
    spec = dropout.dropout_spec_from_config(
        _dropout_config(kind="targeted", rates=ordered), params, {}, GROUPED)
    # conv: '*/conv' selects 1 droppable module, 'encoder/block_00/*' 4.
    # mhsa: 2 heads at rate 0.25 keep round(1.5) = 2, so it stays whole.
    assert {l.name: l.num_kept for l in spec.layers} == {
        "encoder/block_00/ffn1": 96, "encoder/block_00/conv": 16,
        "encoder/block_00/ffn2": 96}
  with pytest.raises(ValueError, match=(
      r"federated.dropout.rates: pattern '\*/attention' matches no unit; "
      r"the units are \[.*'encoder/block_00'")):
    dropout.make_dropout_spec(params, droppable=GROUPED,
                              rates={"*/attention": 0.5})
  with pytest.raises(ValueError, match=r"different values \[0.5, 0.25\]"):
    dropout.make_dropout_spec(params, droppable=GROUPED,
                              rates={"*/conv": 0.5, "encoder/*/conv": 0.25})
  spec = dropout.make_dropout_spec(params, droppable=GROUPED,
                                   freeze_units=("*/conv", "*/mhsa"))
  assert not spec.layers
  assert set(spec.frozen_paths) == {("encoder", "block_00", "conv"),
                                    ("encoder", "block_00", "mhsa")}
  # The topmost selected subtree: the block holds its conv module.
  spec = dropout.make_dropout_spec(
      params, droppable=GROUPED, freeze_units=("*/conv", "encoder/block_0?"))
  assert spec.frozen_paths == (("encoder", "block_00"),)
  with pytest.raises(ValueError, match=(
      r"federated.dropout.freeze_units: pattern 'encoder/block_01' matches"
      r" no unit")):
    dropout.make_dropout_spec(params, droppable=GROUPED,
                              freeze_units=("encoder/block_01",))


# ----------------------------------------------------------------------------
# The round, on a toy model: x [B, 3] -> hidden [B, 4] (w) -> output (v, b).
# ----------------------------------------------------------------------------

IN, HIDDEN, TOY_BATCH = 3, 4, 3
CLIENT_LR = 0.1


def toy_loss(params, model_state, batch, rng):
  del rng
  prediction = batch["x"] @ params["w"] @ params["v"] + params["b"]
  mask = batch["example_mask"]
  squared = jnp.where(mask > 0, (prediction - batch["y"]) ** 2, 0.0)
  return jnp.sum(squared) / jnp.maximum(jnp.sum(mask), 1.0), model_state


TOY_SPEC = submodel_lib.SubmodelSpec(layers=(submodel_lib.DroppedLayer(
    name="hidden", num_units=HIDDEN, num_kept=2, num_groups=1,
    param_leaves=(submodel_lib.GatheredLeaf(("w",), 1),
                  submodel_lib.GatheredLeaf(("v",), 0))),))


def toy_params():
  return {"w": np.linspace(-1, 1, IN * HIDDEN).reshape(IN, HIDDEN).astype(
      np.float32), "v": np.array([0.5, -0.3, 0.8, 0.2], np.float32),
          "b": np.float32(0.1)}


def toy_round_data(local_steps):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, local_steps, TOY_BATCH, IN)).astype(np.float32)
  y = rng.normal(size=(2, local_steps, TOY_BATCH)).astype(np.float32)
  example_mask = np.ones((2, local_steps, TOY_BATCH), np.float32)
  example_mask[1, :, 2] = 0.0  # client 1 has 2 examples per step
  return round_lib.RoundData(
      batches={"x": x, "y": y, "example_mask": example_mask},
      step_mask=np.ones((2, local_steps), np.float32),
      num_examples=example_mask.sum(axis=(1, 2)))


def run_toy_round(spec, data, seed):
  mesh = mesh_lib.make_client_mesh(1)
  server_optimizer = optax.sgd(1.0)
  round_fn = round_lib.make_federated_round(
      toy_loss, optax.sgd(CLIENT_LR), server_optimizer, mesh, submodel=spec)
  state = round_lib.init_server_state(toy_params(), {}, server_optimizer)
  state, metrics = round_fn(state, data, jax.random.key(seed))
  return jax.tree.map(np.asarray, state.params), metrics


def toy_client_kept(seed, client):
  client_rng = jax.random.fold_in(jax.random.fold_in(
      jax.random.key(seed), 0), client)
  kept = submodel_lib.sample_kept_indices(
      TOY_SPEC, jax.random.fold_in(client_rng, submodel_lib.DROPOUT_RNG_TAG))
  return np.asarray(kept["hidden"])


def hand_client_delta(params, kept, x, y, mask, train_v=True):
  """numpy SGD on the sub-model; returns the full-shape delta."""
  w, v, b = params["w"][:, kept], params["v"][kept], params["b"]
  w0, v0, b0 = w.copy(), v.copy(), b
  for step in range(x.shape[0]):
    hidden = x[step] @ w
    residual = (hidden @ v + b - y[step]) * mask[step]
    g = 2.0 * residual / mask[step].sum()  # dL/dprediction [B]
    grad_w = np.outer(x[step].T @ g, v)
    grad_v, grad_b = hidden.T @ g, g.sum()
    w, b = w - CLIENT_LR * grad_w, b - CLIENT_LR * grad_b
    if train_v:
      v = v - CLIENT_LR * grad_v
  delta = {"w": np.zeros_like(params["w"]), "v": np.zeros_like(params["v"])}
  delta["w"][:, kept] = w - w0
  delta["v"][kept] = v - v0
  delta["b"] = b - b0
  return delta


def _overlapping_seed():
  """A seed whose two clients share exactly one kept unit (one unit unused)."""
  for seed in range(50):
    kept0, kept1 = toy_client_kept(seed, 0), toy_client_kept(seed, 1)
    if len(set(kept0) & set(kept1)) == 1:
      return seed, kept0, kept1
  raise AssertionError("no seed with overlapping kept units")


def test_count_normalized_averaging_by_hand():
  seed, kept0, kept1 = _overlapping_seed()
  data = toy_round_data(local_steps=1)
  new_params, metrics = run_toy_round(TOY_SPEC, data, seed)
  params = toy_params()
  x, y, mask = (data.batches[k] for k in ("x", "y", "example_mask"))
  deltas = [hand_client_delta(params, kept, x[c], y[c], mask[c])
            for c, kept in enumerate((kept0, kept1))]
  weights = data.num_examples  # [3, 2]
  trained = np.zeros((2, HIDDEN))
  trained[0, kept0], trained[1, kept1] = 1.0, 1.0
  count = weights @ trained  # [HIDDEN]
  for name in ("w", "v"):
    total = sum(weights[c] * deltas[c][name] for c in range(2))
    mean = np.where(count > 0, total / np.where(count > 0, count, 1), 0.0)
    np.testing.assert_allclose(new_params[name], params[name] + mean,
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      new_params["b"],
      params["b"] + (weights[0] * deltas[0]["b"] + weights[1] * deltas[1]["b"])
      / weights.sum(), rtol=1e-5)
  untrained = np.flatnonzero(count == 0)
  assert len(untrained) == 1
  np.testing.assert_array_equal(new_params["w"][:, untrained],
                                params["w"][:, untrained])
  np.testing.assert_allclose(metrics["submodel_kept_fraction/hidden"], 0.5)


def test_frozen_units_not_trained():
  seed, kept0, kept1 = _overlapping_seed()
  data = toy_round_data(local_steps=2)
  spec = dataclasses.replace(TOY_SPEC, frozen_paths=(("v",),))
  new_params, _ = run_toy_round(spec, data, seed)
  params = toy_params()
  np.testing.assert_array_equal(new_params["v"], params["v"])
  x, y, mask = (data.batches[k] for k in ("x", "y", "example_mask"))
  deltas = [hand_client_delta(params, kept, x[c], y[c], mask[c], train_v=False)
            for c, kept in enumerate((kept0, kept1))]
  weights = data.num_examples
  trained = np.zeros((2, HIDDEN))
  trained[0, kept0], trained[1, kept1] = 1.0, 1.0
  count = weights @ trained
  total = sum(weights[c] * deltas[c]["w"] for c in range(2))
  np.testing.assert_allclose(
      new_params["w"],
      params["w"] + np.where(count > 0, total / np.where(count > 0, count, 1),
                             0.0), rtol=1e-5, atol=1e-6)
  # The client optimizes w's kept columns and b only.
  cost = dropout.client_step_cost(
      toy_loss, optax.adam(0.1), spec, params, {},
      {k: v[0, 0] for k, v in data.batches.items()},
      jax.random.key(0))
  assert cost["params"] == IN * 2 + 1


def test_frozen_by_pattern_stays_bit_equal_over_a_round():
  """freeze_units=('[v]',) selects the toy's leaf v, which the round keeps."""
  spec = dataclasses.replace(TOY_SPEC, frozen_paths=dropout.make_dropout_spec(
      toy_params(), droppable=(), freeze_units=("[v]",)).frozen_paths)
  assert spec.frozen_paths == (("v",),)
  new_params, _ = run_toy_round(spec, toy_round_data(local_steps=2), 0)
  np.testing.assert_array_equal(new_params["v"], toy_params()["v"])
  assert not np.array_equal(new_params["w"], toy_params()["w"])


def test_rate_zero_round_bit_for_bit_equal_to_plain_round():
  """Every unit kept (gather, scatter, count-normalized mean) == plain."""
  data = toy_round_data(local_steps=2)
  keep_all = submodel_lib.SubmodelSpec(layers=tuple(
      dataclasses.replace(layer, num_kept=layer.num_units)
      for layer in TOY_SPEC.layers))
  plain, plain_metrics = run_toy_round(None, data, 0)
  kept_all, metrics = run_toy_round(keep_all, data, 0)
  for name in plain:
    np.testing.assert_array_equal(kept_all[name], plain[name])
  assert float(metrics["loss"]) == float(plain_metrics["loss"])
  assert not np.array_equal(plain["w"], toy_params()["w"])


def toy_loss_with_stats(params, model_state, batch, rng):
  """toy_loss; model_state {'stats': {'s': [units]}}: a running mean of the
  hidden units over the real examples, s' = 0.5 s + 0.5 mean(x @ w)."""
  loss, _ = toy_loss(params, model_state, batch, rng)
  mask = batch["example_mask"]
  hidden = batch["x"] @ params["w"]  # [B, units]
  batch_mean = jnp.sum(hidden * mask[:, None], axis=0) / jnp.sum(mask)
  return loss, {"stats": {"s": 0.5 * model_state["stats"]["s"] +
                          0.5 * batch_mean}}


def test_running_statistics_averaged_over_clients_that_kept_them():
  """A dropped unit's running statistic (batch norm's, in the Conformer's
  conv module) is averaged over the clients that kept the unit, as its
  parameters are; one no client kept keeps the server's value."""
  seed, kept0, kept1 = _overlapping_seed()
  data = toy_round_data(local_steps=1)
  spec = submodel_lib.SubmodelSpec(layers=(dataclasses.replace(
      TOY_SPEC.layers[0],
      state_leaves=(submodel_lib.GatheredLeaf(("stats", "s"), 0),)),))
  stats = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
  mesh = mesh_lib.make_client_mesh(1)
  server_optimizer = optax.sgd(1.0)
  round_fn = round_lib.make_federated_round(
      toy_loss_with_stats, optax.sgd(CLIENT_LR), server_optimizer, mesh,
      submodel=spec)
  state = round_lib.init_server_state(
      toy_params(), {"stats": {"s": stats}}, server_optimizer)
  state, _ = round_fn(state, data, jax.random.key(seed))
  params, weights = toy_params(), data.num_examples  # [3, 2]
  total, count = np.zeros(HIDDEN), np.zeros(HIDDEN)
  for c, kept in enumerate((kept0, kept1)):
    mask = data.batches["example_mask"][c, 0]
    hidden = data.batches["x"][c, 0] @ params["w"][:, kept]
    client_stats = 0.5 * stats[kept] + 0.5 * (mask @ hidden) / mask.sum()
    total[kept] += weights[c] * client_stats
    count[kept] += weights[c]
  expected = np.where(count > 0, total / np.where(count > 0, count, 1), stats)
  np.testing.assert_allclose(state.model_state["stats"]["s"], expected,
                             rtol=1e-5, atol=1e-6)
  untrained = np.flatnonzero(count == 0)
  assert len(untrained) == 1
  assert state.model_state["stats"]["s"][untrained[0]] == stats[untrained[0]]


@pytest.mark.parametrize("norm", ["group_norm", "batch_norm"])
def test_sub_model_is_built_at_the_kept_widths(tiny_models, norm):
  """build_model(config, kept_units) declares the widths; nothing is inferred."""
  _, variables, batch = tiny_models[norm]
  params, state = variables["params"], _state(variables)
  spec = dropout.make_dropout_spec(
      params, state, default_rate=0.5,
      droppable=GROUPED if norm == "group_norm" else UNGROUPED)
  assert spec.kept_units == {
      "encoder/block_00/ffn1": 64, "encoder/block_00/mhsa": 1,
      "encoder/block_00/conv": 16, "encoder/block_00/ffn2": 64}
  inputs = (batch["audio"], batch["audio_paddings"], batch["labels"],
            batch["label_paddings"])
  shapes = jax.eval_shape(
      lambda: _submodel(norm, spec).init(
          jax.random.key(0), *inputs, train=False))
  block = shapes["params"]["encoder"]["block_00"]
  assert block["ffn1"]["dense_in"]["kernel"].shape == (D_MODEL, 64)
  assert block["ffn2"]["dense_out"]["kernel"].shape == (64, D_MODEL)
  assert block["conv"]["pointwise_in"]["kernel"].shape == (D_MODEL, 32)
  # One head of the full model's width D / H = 16.
  assert block["mhsa"]["query"]["kernel"].shape == (D_MODEL, 1, 16)
  # The gathered sub-model variables have exactly these shapes: params, and
  # with batch norm the running statistics of the 16 kept channels.
  kept = submodel_lib.all_kept_indices(spec)
  gathered = {"params": submodel_lib.gather_submodel(spec, params, kept),
              **submodel_lib.gather_submodel(spec, state, kept, "model_state")}
  assert jax.tree.map(np.shape, gathered) == jax.tree.map(
      lambda x: x.shape, shapes)
  if norm == "batch_norm":
    assert shapes["batch_stats"]["encoder"]["block_00"]["conv"]["conv_norm"][
        "mean"].shape == (16,)


@pytest.mark.parametrize("kept_units, message", [
    ({"encoder/block_01/ffn1": 8}, "'encoder/block_01/ffn1' is no droppable"),
    ({"encoder/block_00/final_norm": 8}, "is no droppable module"),
    ({"encoder/block_00/conv": 0}, "conv=0, expected 1 to 32"),
    ({"encoder/block_00/mhsa": 3}, "mhsa=3, expected 1 to 2"),
    ({"encoder/block_0/ffn1": 8}, "'encoder/block_0/ffn1' is no droppable"),
    ({"encoder/block_00/conv": 3}, "not a multiple of conv_norm_groups=2"),
])
def test_sub_model_widths_are_checked(kept_units, message):
  with pytest.raises(ValueError, match=message):
    models.build_model(_tiny_config("group_norm"), kept_units=kept_units)
