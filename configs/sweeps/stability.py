r"""Stability of layer importance: central pre-training over seeds x conv norms.

The paper's claims 2 and 3: which layers are ambient and which critical is the
same across seeds (and model sizes), and survives group norm in place of batch
norm. Every point is a central run (configs/central.py); with --analysis the
analysis pass runs on each, and then compares the first point with the others
(Jaccard overlap of the ambient sets, rank correlations of the importance):
see "stability" in <first point>/analysis/importance.json, its report.md, and
WORKDIR/stability.json.

  python launch/sweep.py --sweep=configs/sweeps/stability.py \
      --workdir=/tmp/cfl/stability --analysis
  # On a TPU pod (see launch/tpu_pod.py; one pod per name, points in turn):
  python launch/sweep.py \
      --sweep=configs/sweeps/stability.py:sizes=S+M,corpus=librispeech \
      --mode=pod --workdir=gs://BUCKET/cfl/stability --name=cfl-v4 \
      --zone=us-central2-b --tfds_data_dir=gs://BUCKET/tfds

Argument (all optional, `key=value,...`; lists are '+'-separated):
  sizes           model sizes; an axis when more than one     (default demo)
  seeds           number of seeds, 0 .. seeds-1                (3)
  norms           conv-module norms               (group_norm+batch_norm)
  corpus          synthetic_speech config, or librispeech      (demo)
  domain          training domain: long | short | all          (long)
  steps           training steps                               (1200)
  eval_batches    eval batches, in training and analysis (0 = all)  (0)
  granularity     analysis units: block | module               (block)
  analysis_seeds  re-randomization draws per unit              (3)
"""

import ml_collections

from conformer_fl import config_lib


def _list(value: str) -> tuple[str, ...]:
  items = tuple(v for v in value.split("+") if v)
  if not items:
    raise ValueError(f"Expected '+'-separated values, got {value!r}.")
  return items


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, sizes="demo", seeds=3,
                           norms="group_norm+batch_norm", corpus="demo",
                           domain="long", steps=1200, eval_batches=0,
                           granularity="block", analysis_seeds=3)
  if a.seeds < 1:
    raise ValueError(f"seeds must be >= 1, got {a.seeds}.")
  sizes = _list(a.sizes)
  sweep = ml_collections.ConfigDict()
  sweep.base = ml_collections.ConfigDict()
  sweep.base.config = "configs/central.py"
  sweep.base.arg = (f"size={sizes[0]},corpus={a.corpus},domain={a.domain},"
                    f"steps={a.steps}")
  axes = [("seed", tuple(range(a.seeds))), ("norm", _list(a.norms))]
  if len(sizes) > 1:
    axes.insert(0, ("size", sizes))
  sweep.axes = tuple(axes)
  sweep.overrides = ((f"eval_max_batches={a.eval_batches}",)
                     if a.eval_batches else ())
  sweep.analysis = ml_collections.ConfigDict()
  sweep.analysis.config = "configs/analysis.py"
  sweep.analysis.arg = f"granularity={a.granularity},seeds={a.analysis_seeds}"
  sweep.analysis.overrides = ((f"analysis.eval_max_batches={a.eval_batches}",)
                              if a.eval_batches else ())
  return sweep
