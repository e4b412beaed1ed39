"""CheckpointStore saves and restores, whatever form the workdir is given in."""

import os

import numpy as np

from conformer_fl import checkpointing


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  # `make demo` passes --workdir=runs/demo; orbax itself refuses relative paths.
  monkeypatch.chdir(tmp_path)
  state = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
           "round": np.int32(7)}
  store = checkpointing.CheckpointStore(os.path.join("runs", "demo"))
  store.save(0, state)
  store.close()

  assert store.directory == tmp_path / "runs" / "demo" / "checkpoints"
  reader = checkpointing.CheckpointStore("runs/demo", read_only=True)
  assert reader.all_steps() == [0]
  restored = reader.restore(0)
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert int(restored["round"]) == 7
  reader.close()
