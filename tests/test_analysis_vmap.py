"""Reset variants and their vectorized evaluation (random tiny model and data)."""

import jax
import numpy as np
import pytest

from conformer_fl import models
from conformer_fl import tree_paths
from conformer_fl.analysis import importance
from conformer_fl.analysis import resets
from conformer_fl.analysis import variant_eval
from conformer_fl.federated import mesh as mesh_lib

VOCAB = 16
VARIANTS_PER_CALL = 3


@pytest.fixture(scope="module")
def model():
  return models.build_model(models.get_model_config(
      "tiny", conv_norm="batch_norm", vocab_size=VOCAB, num_blocks=1))


@pytest.fixture(scope="module")
def vectorized_fn(model):
  return variant_eval.make_vectorized_eval_fn(model)


@pytest.fixture(scope="module")
def single_fn(model):
  return variant_eval.make_single_eval_fn(model)


@pytest.fixture(scope="module")
def inits(model):
  """Three initializations; seed 2 with batch statistics moved off init."""
  variables = importance.fresh_initializations(model, [0, 1, 2])
  variables[2]["batch_stats"] = jax.tree.map(lambda x: x + 0.5,
                                             variables[2]["batch_stats"])
  return variables


def _batches(num_batches=2, batch_size=3, seconds=0.5, label_length=6):
  rng = np.random.default_rng(0)
  samples = int(16000 * seconds)
  batches = []
  for _ in range(num_batches):
    lengths = rng.integers(samples // 2, samples, size=batch_size)
    audio_paddings = (np.arange(samples)[None] >= lengths[:, None]).astype(
        np.float32)
    label_lengths = rng.integers(1, label_length, size=batch_size)
    label_paddings = (np.arange(label_length)[None] >=
                      label_lengths[:, None]).astype(np.float32)
    batches.append(dict(
        audio=(rng.normal(size=(batch_size, samples)) * 0.1 *
               (1 - audio_paddings)).astype(np.float32),
        audio_paddings=audio_paddings,
        labels=(rng.integers(1, VOCAB, size=(batch_size, label_length)) *
                (1 - label_paddings)).astype(np.int32),
        label_paddings=label_paddings,
        example_mask=np.array([1.0] * (batch_size - 1) + [0.0], np.float32)))
  return batches


def _decode(ids):
  return " ".join(f"w{i}" for i in ids)


def test_fresh_initializations_equal_init_variables(model, inits):
  expected = models.init_variables(model, 1)
  jax.tree.map(np.testing.assert_array_equal, expected, inits[1])


def test_reset_unit_replaces_params_and_batch_stats_of_that_unit_only(inits):
  trained, source = inits[0], inits[2]
  units = models.list_units(trained["params"], "module")
  path = units["encoder/block_00/conv"]
  reset = resets.reset_unit(trained, source, path)
  for collection in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal,
                 tree_paths.get(reset[collection], path),
                 tree_paths.get(source[collection], path))
  # Untouched subtrees are shared, not copied.
  assert reset["params"]["decoder"] is trained["params"]["decoder"]
  assert (reset["params"]["encoder"]["block_00"]["mhsa"] is
          trained["params"]["encoder"]["block_00"]["mhsa"])
  # A unit without batch norm leaves the statistics alone.
  ffn_path = units["encoder/block_00/ffn1"]
  ffn = resets.reset_unit(trained, source, ffn_path)
  assert ffn["batch_stats"] is trained["batch_stats"]
  jax.tree.map(np.testing.assert_array_equal,
               tree_paths.get(ffn["params"], ffn_path),
               tree_paths.get(source["params"], ffn_path))
  with pytest.raises(KeyError, match="encoder/block_09"):
    resets.reset_unit(trained, source, ("encoder", "block_09"))


def _variants(inits):
  trained = inits[0]
  units = models.list_units(trained["params"], "module")
  return [
      trained,
      resets.reset_unit(trained, inits[2], units["encoder/block_00/conv"]),
      resets.reset_unit(trained, inits[1], units["encoder/block_00/mhsa"]),
      resets.reset_unit(trained, inits[2], units["decoder"]),
      inits[1],
  ]


def test_vectorized_outputs_equal_each_variant_alone(vectorized_fn, single_fn,
                                                     inits):
  variants = _variants(inits)[:VARIANTS_PER_CALL]
  batch = _batches()[0]
  batched, shared = variant_eval.split_shared(variants)
  # No variant here resets the front end: it is passed once, unbatched.
  assert list(shared["params"]) == ["encoder/subsampling"]
  assert "subsampling" not in batched["params"]["encoder"]
  assert all(x.shape[0] == len(variants)
             for x in jax.tree.leaves(batched["params"]["decoder"]))
  vectorized = vectorized_fn(batched, shared, batch)
  losses = []
  for row, variables in enumerate(variants):
    alone = single_fn(variables, batch)
    np.testing.assert_allclose(vectorized["loss_sum"][row], alone["loss_sum"],
                               rtol=1e-5)
    np.testing.assert_array_equal(vectorized["ids"][row], alone["ids"])
    np.testing.assert_array_equal(vectorized["id_paddings"][row],
                                  alone["id_paddings"])
    losses.append(float(alone["loss_sum"]))
  assert len(set(losses)) == len(variants)  # The variants really differ.


def test_chunked_vectorized_evaluation_equals_one_at_a_time(
    vectorized_fn, single_fn, inits):
  variants = _variants(inits)
  batches = _batches()
  # 5 variants: a chunk of 3 (front end shared), then 2 padded to 3 (front
  # end batched: variant 4 is another initialization).
  chunked = variant_eval.evaluate_vectorized(
      vectorized_fn, variants.__getitem__, len(variants), batches, _decode,
      variants_per_call=VARIANTS_PER_CALL)
  looped = variant_eval.evaluate_one_at_a_time(
      single_fn, variants.__getitem__, len(variants), batches, _decode)
  # Chunks within groups, in any order: [3, 0, 2], then [1, 4] as one chunk
  # of 2 (a group smaller than variants_per_call is not padded).
  grouped = variant_eval.evaluate_vectorized(
      vectorized_fn, variants.__getitem__, len(variants), batches, _decode,
      variants_per_call=VARIANTS_PER_CALL, groups=[[3, 0, 2], [1, 4]])
  assert len(chunked) == len(grouped) == len(looped) == len(variants)
  for a, b, c in zip(chunked, looped, grouped):
    assert a["num_examples"] == b["num_examples"] == 4.0
    assert a["wer"] == b["wer"] == c["wer"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert c["loss"] == pytest.approx(b["loss"], rel=1e-5)
  with pytest.raises(ValueError, match="partition"):
    variant_eval.evaluate_vectorized(
        vectorized_fn, variants.__getitem__, len(variants), batches, _decode,
        variants_per_call=2, groups=[[0, 1]])


def test_variants_split_over_the_mesh_equal_one_at_a_time(
    model, single_fn, inits):
  mesh = mesh_lib.make_client_mesh()
  assert mesh.size == 4
  variants = _variants(inits)
  batches = _batches()
  looped = variant_eval.evaluate_one_at_a_time(
      single_fn, variants.__getitem__, len(variants), batches, _decode)
  # 3 per call rounds up to 4 (one per device): groups [3, 0, 2] (padded
  # with a repeat of 2) and [1, 4] (padded to 4 as well).
  built = []

  def get_variables(index):
    built.append(index)
    return variants[index]

  sharded = variant_eval.evaluate_vectorized(
      variant_eval.make_vectorized_eval_fn(model, mesh), get_variables,
      len(variants), batches, _decode, variants_per_call=VARIANTS_PER_CALL,
      groups=[[3, 0, 2], [1, 4]], mesh=mesh)
  assert built == [3, 0, 2, 2, 1, 4, 4, 4]
  for a, b in zip(sharded, looped):
    assert a["num_examples"] == b["num_examples"] == 4.0
    assert a["wer"] == b["wer"]
    assert a["cer"] == b["cer"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_shareable_groups_put_front_end_resets_apart():
  paths = [None, ("encoder", "subsampling"), ("encoder", "block_00", "conv"),
           ("encoder",), ("decoder",)]
  assert variant_eval.shareable_groups(paths) == [[0, 2, 4], [1, 3]]
  assert variant_eval.shareable_groups([None, ("decoder",)]) == [[0, 1]]


def test_evaluation_rejects_empty_inputs(model):
  with pytest.raises(ValueError, match="No eval batches"):
    variant_eval.evaluate_one_at_a_time(None, None, 1, [], _decode)
  with pytest.raises(ValueError, match="variants_per_call"):
    variant_eval.evaluate_vectorized(None, None, 1, _batches(1), _decode, 0)
