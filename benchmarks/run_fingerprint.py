r"""Fingerprints of finished runs: equal fingerprints mean bit-identical runs.

For each workdir it prints one JSON line: the sha256 of every saved checkpoint
(every leaf's name, dtype, shape and bytes, in leaf-name order, restored and
verified by `conformer_fl.checkpointing`), of metrics.jsonl with its timing
fields (keys ending in `_per_second`) left out, and of eval_samples.txt. With
two or more workdirs it also says whether all fingerprints are equal, and
exits with status 1 when they are not.

A change that must not change behaviour (a restructuring of the training
loops) is checked by running the same tiny runs before and after it, e.g. with
TFDS_DATA_DIR set and XLA_FLAGS=--xla_force_host_platform_device_count=4:
  python -m conformer_fl.main \
      --config=configs/central.py:size=tiny,corpus=tiny,steps=7 \
      --config.central.log_every=2 --config.central.eval_every=3 \
      --config.central.checkpoint_every=4 --config.eval_max_batches=1 \
      --workdir=/tmp/before_central
  python -m conformer_fl.main \
      --config=configs/federated.py:size=tiny,corpus=tiny,server=fedadam,rounds=5 \
      --config.federated.log_every=2 --config.federated.eval_every=2 \
      --config.federated.checkpoint_every=3 --config.eval_max_batches=1 \
      --workdir=/tmp/before_fed
then, after the change, the same into /tmp/after_central and /tmp/after_fed, and
  python benchmarks/run_fingerprint.py /tmp/before_central /tmp/after_central
  python benchmarks/run_fingerprint.py /tmp/before_fed /tmp/after_fed
The fingerprints depend on the machine (XLA's CPU code), so compare runs of
one machine only.
"""

import hashlib
import json
import os
import sys
from typing import Any

import numpy as np

from conformer_fl import checkpointing
from conformer_fl import metric_logging
from conformer_fl import workdir as workdir_lib

TIMING_SUFFIX = "_per_second"


def checkpoint_digests(workdir: str) -> dict[str, str]:
  """{step: sha256 of its leaves} of every checkpoint of `workdir`."""
  store = checkpointing.CheckpointStore(workdir, read_only=True)
  try:
    digests = {}
    for step in store.all_steps():
      leaves = checkpointing.host_leaves(store.restore(step))
      digest = hashlib.sha256()
      for name in sorted(leaves):
        value = np.ascontiguousarray(leaves[name])
        digest.update(f"{name}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
      digests[str(step)] = digest.hexdigest()
    return digests
  finally:
    store.close()


def metrics_digest(workdir: str) -> tuple[str, int]:
  """(sha256 of metrics.jsonl's records less timing fields, record count)."""
  records = workdir_lib.Workdir(workdir).metrics()
  kept = [{k: v for k, v in r.items() if not k.endswith(TIMING_SUFFIX)}
          for r in records]
  text = "\n".join(json.dumps(r, sort_keys=True) for r in kept)
  return hashlib.sha256(text.encode()).hexdigest(), len(kept)


def fingerprint(workdir: str) -> dict[str, Any]:
  """The fingerprint of the run in `workdir` (module docstring)."""
  metrics, count = metrics_digest(workdir)
  samples = os.path.join(workdir, metric_logging.SAMPLES_FILE)
  with open(samples, "rb") as f:
    samples_digest = hashlib.sha256(f.read()).hexdigest()
  return {"checkpoints": checkpoint_digests(workdir), "metrics": metrics,
          "metric_records": count, "eval_samples": samples_digest}


def main(workdirs: list[str]) -> int:
  if not workdirs:
    print(__doc__)
    return 2
  prints = [fingerprint(w) for w in workdirs]
  for workdir, p in zip(workdirs, prints):
    print(json.dumps({"workdir": workdir, **p}))
  if len(prints) > 1:
    same = all(p == prints[0] for p in prints[1:])
    print("identical" if same else "DIFFERENT")
    return 0 if same else 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
