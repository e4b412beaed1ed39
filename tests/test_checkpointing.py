"""CheckpointStore saves and restores, whatever form the workdir is given in."""

import logging
import os
import types

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


def test_reads_a_failed_restore_abandoned_end_in_one_log_line(capfd, caplog):
  """A suspended read whose cleanup fails, dropped as orbax drops the other
  reads of a damaged step: no traceback on stderr, one line in the log."""

  @types.coroutine
  def pending():
    yield  # Suspends the coroutine, as a pending read is.

  async def read():
    try:
      await pending()
    finally:
      raise ValueError("Truncated Zstd-compressed stream")

  caplog.set_level(logging.INFO)
  with checkpointing._abandoned_reads_logged():  # pylint: disable=protected-access
    abandoned = read()
    abandoned.send(None)
    del abandoned
  assert "Traceback" not in capfd.readouterr().err
  assert ("An abandoned read of a damaged checkpoint failed too: ValueError:"
          " Truncated Zstd-compressed stream") in caplog.text
