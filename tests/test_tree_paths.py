"""conformer_fl/tree_paths.py: paths into nested dicts, pure and sharing."""

import numpy as np
import pytest

from conformer_fl import tree_paths


def _tree():
  return {"encoder": {"block_00": {"w": np.ones(2), "b": np.zeros(2)},
                      "block_01": {"w": np.full(2, 2.0)}},
          "decoder": {"w": np.arange(3.0)}}


def test_get_returns_the_object_itself_and_names_a_bad_path():
  tree = _tree()
  assert tree_paths.get(tree, ("encoder", "block_01")) is (
      tree["encoder"]["block_01"])
  assert tree_paths.get(tree, ()) is tree
  with pytest.raises(KeyError, match="'encoder/block_09'.*'block_09' at"
                     " 'encoder'"):
    tree_paths.get(tree, ("encoder", "block_09"))
  assert tree_paths.has(tree, ("decoder", "w"))
  assert not tree_paths.has(tree, ("decoder", "w", "x"))


def test_replace_copies_only_the_dicts_on_the_path():
  tree = _tree()
  new = tree_paths.replace(tree, ("encoder", "block_00", "w"), 5.0)
  assert new["encoder"]["block_00"]["w"] == 5.0
  np.testing.assert_array_equal(tree["encoder"]["block_00"]["w"], np.ones(2))
  # Untouched subtrees are the very same objects.
  assert new["decoder"] is tree["decoder"]
  assert new["encoder"]["block_01"] is tree["encoder"]["block_01"]
  assert new["encoder"]["block_00"]["b"] is tree["encoder"]["block_00"]["b"]
  with pytest.raises(KeyError, match="encoder/block_02"):
    tree_paths.replace(tree, ("encoder", "block_02"), {})
  both = tree_paths.replace_all(tree, {("decoder",): None,
                                       ("encoder", "block_01", "w"): 1})
  assert both["decoder"] is None and both["encoder"]["block_01"]["w"] == 1


def test_without_and_put_are_inverse():
  tree = _tree()
  path = ("encoder", "block_01")
  trimmed = tree_paths.without(tree, path)
  assert sorted(trimmed["encoder"]) == ["block_00"]
  assert trimmed["decoder"] is tree["decoder"]
  restored = tree_paths.put(trimmed, path, tree_paths.get(tree, path))
  assert tree_paths.leaf_paths(restored) == tree_paths.leaf_paths(tree)
  assert tree_paths.get(restored, path) is tree["encoder"]["block_01"]
  assert tree_paths.put({}, ("a", "b"), 1) == {"a": {"b": 1}}


def test_flat_views():
  tree = _tree()
  assert tree_paths.leaf_paths(tree) == [
      ("encoder", "block_00", "w"), ("encoder", "block_00", "b"),
      ("encoder", "block_01", "w"), ("decoder", "w")]
  flat = tree_paths.flatten({**tree, "empty": {}})
  assert len(flat) == 5
  assert tree_paths.unflatten(flat)["empty"] == {}
