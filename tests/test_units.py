"""Layer units: names are parameter-tree paths and partition the parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conformer_fl import config_lib
from conformer_fl.training import divergence
from conformer_fl import models
from conformer_fl import optimizers
from conformer_fl import steps
from conformer_fl import tree_paths
from conformer_fl import unit_patterns

import entry_point  # tests/entry_point.py

SUBMODULES = ("ffn1", "mhsa", "conv", "ffn2", "final_norm")


def _params(decoder: str, num_blocks: int = 3):
  config = models.get_model_config("tiny", decoder=decoder,
                                   num_blocks=num_blocks)
  model = models.build_model(config)
  audio = jnp.zeros((1, 4000))
  labels = jnp.zeros((1, 3), jnp.int32)
  shapes = jax.eval_shape(
      lambda rng: model.init(rng, audio, audio, labels, labels * 0.0,
                             train=False), jax.random.key(0))["params"]
  counter = iter(range(10**6))
  # Distinct constant leaves, so that a moved or lost leaf is visible.
  return jax.tree.map(lambda s: np.full(s.shape, next(counter), np.float32),
                      shapes)


@pytest.fixture(scope="module", params=["ctc", "rnnt"])
def params(request):
  return _params(request.param)


def _leaf_paths(tree) -> list[tuple[str, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [tuple(key.key for key in path) for path, _ in leaves]


def test_block_units_are_named_paths(params):
  units = models.list_units(params, "block")
  assert list(units) == ["encoder/subsampling", "encoder/block_00",
                         "encoder/block_01", "encoder/block_02", "decoder"]
  for name, path in units.items():
    assert name == "/".join(path)


def test_module_units_are_named_paths(params):
  units = models.list_units(params, "module")
  expected = (["encoder/subsampling"] +
              [f"encoder/block_{b:02d}/{m}" for b in range(3)
               for m in SUBMODULES] + ["decoder"])
  assert list(units) == expected
  for name, path in units.items():
    assert name == "/".join(path)
    tree_paths.get(params, path)  # Every path exists in the tree.


@pytest.mark.parametrize("granularity", ["block", "module"])
def test_units_partition_the_parameters(params, granularity):
  units = list(models.list_units(params, granularity).values())
  leaf_paths = _leaf_paths(params)
  for leaf in leaf_paths:
    owners = [unit for unit in units if leaf[:len(unit)] == unit]
    assert len(owners) == 1, (leaf, owners)
  # Sizes add up: no unit overlaps another, none is empty.
  sizes = [sum(x.size for x in jax.tree.leaves(tree_paths.get(params, u)))
           for u in units]
  assert min(sizes) > 0
  assert sum(sizes) == sum(x.size for x in jax.tree.leaves(params))


def test_block_has_its_module_units(params):
  block = models.list_units(params, "module")
  for b in range(3):
    children = [name for name in block
                if name.startswith(f"encoder/block_{b:02d}/")]
    assert len(children) == len(SUBMODULES)


def test_replacing_a_unit_changes_only_that_unit(params):
  path = ("encoder", "block_01", "conv")
  original = tree_paths.get(params, path)
  zeros = jax.tree.map(np.zeros_like, original)
  updated = tree_paths.replace(params, path, zeros)
  assert all(np.all(x == 0) for x in jax.tree.leaves(
      tree_paths.get(updated, path)))
  # The input tree is untouched (pure function).
  jax.tree.map(np.testing.assert_array_equal, tree_paths.get(params, path),
               original)
  assert any(np.any(x != 0) for x in jax.tree.leaves(original))
  # Every other unit is unchanged.
  for name, other in models.list_units(params, "module").items():
    if other != path:
      jax.tree.map(np.testing.assert_array_equal,
                   tree_paths.get(updated, other),
                   tree_paths.get(params, other))
  assert (jax.tree.structure(updated) == jax.tree.structure(params))


def test_bad_paths_and_granularity_are_named(params):
  with pytest.raises(KeyError, match="block_09"):
    tree_paths.get(params, ("encoder", "block_09"))
  with pytest.raises(KeyError, match="attention"):
    tree_paths.replace(params, ("encoder", "block_00", "attention"), {})
  with pytest.raises(ValueError, match="layer"):
    models.list_units(params, "layer")


# ----------------------------------------------------------------------------
# Unit selections by pattern (conformer_fl/unit_patterns.py).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, expected", [
    ("encoder/block_01/conv", ["encoder/block_01/conv"]),  # An exact name.
    ("*/conv", [f"encoder/block_{b:02d}/conv" for b in range(3)]),
    ("encoder/block_0[01]/*", [f"encoder/block_{b:02d}/{m}" for b in range(2)
                               for m in SUBMODULES]),
    ("encoder/block_01", [f"encoder/block_01/{m}" for m in SUBMODULES]),
    ("*/ffn?", [f"encoder/block_{b:02d}/ffn{i}" for b in range(3)
                for i in (1, 2)]),
    ("decoder", ["decoder"]),
])
def test_patterns_select_units(params, pattern, expected):
  names = list(models.list_units(params, "module"))
  assert len(names) == 17
  assert unit_patterns.match_units([pattern], names, field="f") == {
      pattern: expected}
  assert len(unit_patterns.select_units(("encoder/*",), names,
                                        field="f")) == 16
  assert unit_patterns.select_units(("*/conv", "encoder/block_00"), names,
                                    field="f") == (
                                        [f"encoder/block_00/{m}"
                                         for m in SUBMODULES] +
                                        ["encoder/block_01/conv",
                                         "encoder/block_02/conv"])


def test_most_specific_rate_pattern_wins(params):
  names = list(models.list_units(params, "module"))
  values = {"*/conv": 0.5, "encoder/block_00/*": 0.25,
            "encoder/block_00/conv": 0.1}
  for ordered in (values, dict(reversed(values.items()))):
    assigned = unit_patterns.assign_to_units(ordered, names, field="f")
    # block_00/conv: selected by all three; the exact name (1 unit) wins
    # over block_00/* (5 units) and */conv (3 units).
    assert assigned["encoder/block_00/conv"] == 0.1
    assert assigned["encoder/block_01/conv"] == 0.5
    assert assigned["encoder/block_00/ffn1"] == 0.25
    assert "encoder/block_01/ffn1" not in assigned
    assert len(assigned) == 5 + 2
  # Equally specific, overlapping, different values: refused.
  with pytest.raises(ValueError, match=r"f: patterns \['\*/conv', "
                     r"'\*/c\?nv'\] each select 3 unit\(s\)"):
    unit_patterns.assign_to_units({"*/conv": 0.5, "*/c?nv": 0.25}, names,
                                  field="f")
  same = unit_patterns.assign_to_units({"*/conv": 0.5, "*/c?nv": 0.5}, names,
                                       field="f")
  assert same["encoder/block_02/conv"] == 0.5


def test_bad_unit_patterns_are_refused_with_the_names(params):
  with pytest.raises(ValueError, match=(
      r"central.frozen_units: pattern 'encoder/block_09/\*' matches no unit;"
      r" the units are \['encoder/subsampling', 'encoder/block_00/ffn1'")):
    optimizers.freeze_units(optax.sgd(1.0), params, ("encoder/block_09/*",))
  with pytest.raises(ValueError, match='matches no unit.*\'decoder\''):
    optimizers.freeze_units(optax.sgd(1.0), params, ("*/attention",))
  with pytest.raises(ValueError, match=r"got the string '\*/conv'"):
    optimizers.freeze_units(optax.sgd(1.0), params, "*/conv")


def test_unit_patterns_take_one_config_line():
  config = entry_point.parse_config(
      "configs/central.py:size=tiny,corpus=tiny",
      '--config.central.frozen_units=("encoder/block_0[01]/*",)')
  assert tuple(config.central.frozen_units) == ("encoder/block_0[01]/*",)
  config = entry_point.parse_config(
      "configs/federated.py:size=tiny,corpus=tiny",
      "--config.federated.dropout.kind=targeted",
      '--config.federated.dropout.rates={"*/conv": 0.5}')
  assert dict(config.federated.dropout.rates) == {"*/conv": 0.5}


def test_frozen_by_pattern_stays_bit_equal_over_central_steps():
  """Three central steps (steps.py) with blocks 0 and 1 frozen by pattern."""
  config = config_lib.central_run_config(size="tiny", corpus="tiny")
  config.model.num_blocks = 3
  config.central.warmup_steps = 1
  config.central.frozen_units = ("encoder/block_0[01]/*",)
  model = models.build_model(config.model)
  rng = np.random.default_rng(0)
  batch = {
      "audio": (0.1 * rng.normal(size=(2, 8000))).astype(np.float32),
      "audio_paddings": np.zeros((2, 8000), np.float32),
      "labels": np.array([[3, 4, 5], [6, 7, 0]], np.int32),
      "label_paddings": np.array([[0, 0, 0], [0, 0, 1]], np.float32),
      "example_mask": np.ones((2,), np.float32),
  }
  # One compiled init (models.init_variables): op by op, it takes longer than
  # the train step's compile.
  variables = models.init_variables(model, 0)
  params, model_state = models.split_variables(variables)
  optimizer = optimizers.make_central_optimizer(config.central, params)
  state = dict(params=params, model_state=model_state,
               opt_state=optimizer.init(params), step=jnp.int32(0))
  step = jax.jit(steps.make_central_train_step(model, optimizer))
  guard = divergence.init_guard()
  for _ in range(3):
    state, _, guard = step(state, batch, jax.random.key(1), guard)
  for name, path in models.list_units(params, "module").items():
    before, after = (jax.tree.leaves(tree_paths.get(p, path))
                     for p in (params, state["params"]))
    frozen = name.startswith(("encoder/block_00/", "encoder/block_01/"))
    same = all(np.array_equal(a, b) for a, b in zip(before, after))
    assert same == frozen, name
