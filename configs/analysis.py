r"""Layer importance of a trained run: reset each unit, evaluate, classify.

A separate pass over a finished (or running) workdir W of a central or federated
run; it reads W/config.json, W/tokenizer.model, W/checkpoints and
W/metrics.jsonl, and writes W/analysis/ (importance.json, heatmaps, bar chart,
scatter, report.md). See `conformer_fl.analysis` for the method and the schema.

  python -m conformer_fl.main --config=configs/analysis.py --workdir=/tmp/cfl/central
  python -m conformer_fl.main --config=configs/analysis.py:granularity=module,seeds=5 \
      --workdir=/tmp/cfl/central \
      --config.analysis.compare_workdirs="('/tmp/cfl/central_seed1','/tmp/cfl/central_bn')"

Argument (all optional, `key=value,...`):
  granularity  block | module                                   (default block)
  seeds        re-randomization draws per unit                   (3)
  variants     reset variants evaluated per compiled call        (8)
"""

import ml_collections

from conformer_fl import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, granularity="block", seeds=3, variants=8)
  # Fields: config_lib.analysis_run_config, which documents each one.
  return config_lib.analysis_run_config(**a)
