r"""HBM per chip and compile time of a round with capacity tiers, for a TPU.

`launch/tpu_pod.py plan` of the tiny federated round on 1-second buckets (one
local step of one utterance) with three capacity tiers of 4 clients each:
widths 1, 0.75 and 0.5 of the feed-forward and conv-module layers, static
policy, each tier vmapped at its own widths inside the one compiled round.
libtpu compiles it for the TPU topology on this machine's CPU (`pip install -e
'.[tpu-plan]'`). Printed: each tier's clients per chip and kept widths, the
HBM per chip the compiled round uses, its FLOPs, and the seconds of its one
compile (the tiers fix each tier's clients, so no count is searched).

  .venv/bin/python benchmarks/tiered_plan.py --topology=v5e:2x2

The flags are `tpu_pod.py plan`'s (`--topology`, `--max_compiles`, ...).
Measured on a 2-core CPU host: about a minute for the compile; the round used
under 1 GiB of the v5e chip's 16 GiB. tests/test_tpu_plan.py plans the same
round without compiling it.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import tpu_pod  # pylint: disable=g-import-not-at-top,wrong-import-position

# Three capacity tiers of 4 clients each: one client per chip of a 4-chip
# topology in each tier.
TIERED_ROUND = (
    "--config=configs/federated.py:size=tiny",
    "--config.data.bucket_seconds=(1.0,)",
    "--config.federated.local_steps=1",
    "--config.federated.client_batch_size=1",
    "--config.federated.clients_per_round=12",
    "--config.federated.dropout.tiers="
    "((0.333333,1.0),(0.333333,0.75),(0.333334,0.5))",
    "--config.federated.dropout.unit_kinds=('ffn','conv')",
    "--config.federated.dropout.policy=static")


if __name__ == "__main__":
  try:
    tpu_pod.main(["plan", *sys.argv[1:], "--", *TIERED_ROUND])
  except tpu_pod.LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
