"""Layer units: names are parameter-tree paths and partition the parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conformer_fl import models

SUBMODULES = ('ffn1', 'mhsa', 'conv', 'ffn2', 'final_norm')


def _params(decoder: str, num_blocks: int = 3):
  config = models.get_model_config('tiny', decoder=decoder,
                                   num_blocks=num_blocks)
  model = models.build_model(config)
  audio = jnp.zeros((1, 4000))
  labels = jnp.zeros((1, 3), jnp.int32)
  shapes = jax.eval_shape(
      lambda rng: model.init(rng, audio, audio, labels, labels * 0.0,
                             train=False), jax.random.key(0))['params']
  counter = iter(range(10**6))
  # Distinct constant leaves, so that a moved or lost leaf is visible.
  return jax.tree.map(lambda s: np.full(s.shape, next(counter), np.float32),
                      shapes)


@pytest.fixture(scope='module', params=['ctc', 'rnnt'])
def params(request):
  return _params(request.param)


def _leaf_paths(tree) -> list[tuple[str, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [tuple(key.key for key in path) for path, _ in leaves]


def test_block_units_are_named_paths(params):
  units = models.list_units(params, 'block')
  assert list(units) == ['encoder/subsampling', 'encoder/block_00',
                         'encoder/block_01', 'encoder/block_02', 'decoder']
  for name, path in units.items():
    assert name == '/'.join(path)


def test_module_units_are_named_paths(params):
  units = models.list_units(params, 'module')
  expected = (['encoder/subsampling'] +
              [f'encoder/block_{b:02d}/{m}' for b in range(3)
               for m in SUBMODULES] + ['decoder'])
  assert list(units) == expected
  for name, path in units.items():
    assert name == '/'.join(path)
    models.get_unit(params, path)  # Every path exists in the tree.


@pytest.mark.parametrize('granularity', ['block', 'module'])
def test_units_partition_the_parameters(params, granularity):
  units = list(models.list_units(params, granularity).values())
  leaf_paths = _leaf_paths(params)
  for leaf in leaf_paths:
    owners = [unit for unit in units if leaf[:len(unit)] == unit]
    assert len(owners) == 1, (leaf, owners)
  # Sizes add up: no unit overlaps another, none is empty.
  sizes = [sum(x.size for x in jax.tree.leaves(models.get_unit(params, u)))
           for u in units]
  assert min(sizes) > 0
  assert sum(sizes) == sum(x.size for x in jax.tree.leaves(params))


def test_block_has_its_module_units(params):
  block = models.list_units(params, 'module')
  for b in range(3):
    children = [name for name in block
                if name.startswith(f'encoder/block_{b:02d}/')]
    assert len(children) == len(SUBMODULES)


def test_set_unit_replaces_only_that_unit(params):
  path = ('encoder', 'block_01', 'conv')
  original = models.get_unit(params, path)
  zeros = jax.tree.map(np.zeros_like, original)
  updated = models.set_unit(params, path, zeros)
  assert all(np.all(x == 0) for x in jax.tree.leaves(
      models.get_unit(updated, path)))
  # The input tree is untouched (pure function).
  jax.tree.map(np.testing.assert_array_equal, models.get_unit(params, path),
               original)
  assert any(np.any(x != 0) for x in jax.tree.leaves(original))
  # Every other unit is unchanged.
  for name, other in models.list_units(params, 'module').items():
    if other != path:
      jax.tree.map(np.testing.assert_array_equal,
                   models.get_unit(updated, other),
                   models.get_unit(params, other))
  assert (jax.tree.structure(updated) == jax.tree.structure(params))


def test_bad_paths_and_granularity_are_named(params):
  with pytest.raises(KeyError, match='block_09'):
    models.get_unit(params, ('encoder', 'block_09'))
  with pytest.raises(KeyError, match='attention'):
    models.set_unit(params, ('encoder', 'block_00', 'attention'), {})
  with pytest.raises(ValueError, match='layer'):
    models.list_units(params, 'layer')
