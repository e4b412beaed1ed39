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
from ml_collections import config_dict

from conformer_fl import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, granularity='block', seeds=3, variants=8)
  config = ml_collections.ConfigDict()
  config.mode = 'analysis'
  analysis = config.analysis = ml_collections.ConfigDict()
  # Units: `conformer_fl.models.list_units` at this granularity.
  analysis.granularity = a.granularity
  # Re-initialization checkpoints tau: 'all' (every saved step up to the
  # trained one) or comma-separated steps, e.g. '0,100,400'. Step 0 (the
  # initial value, which decides ambient vs critical) is always included.
  analysis.taus = 'all'
  # The "trained" checkpoint T whose units are reset; -1 = the latest.
  analysis.trained_step = -1
  # Re-randomization: fresh draws of each unit from its initializer, by
  # initializing the model with seed run_seed + rerandomize_seed_offset + i.
  analysis.num_rerandomize_seeds = a.seeds
  analysis.rerandomize_seed_offset = 1000
  # Evaluation data: '' / None = the run's own config.data fields.
  analysis.eval_split = ''
  analysis.eval_domains = config_dict.placeholder(tuple)
  analysis.data_dir = ''
  analysis.eval_max_batches = 0  # 0 = the whole split.
  # Ambient vs critical: the WER increase after the tau=0 reset against
  # max_abs_wer_increase (WER points, 0.01 = 1%) and relative to the baseline
  # WER against max_rel_wer_increase; threshold_rule 'either' calls a unit
  # ambient when one test passes, 'both' when both do.
  analysis.max_abs_wer_increase = 0.01
  analysis.max_rel_wer_increase = 0.05
  analysis.threshold_rule = 'either'
  # Evaluation: variants stacked on a leading axis and vmapped, this many per
  # compiled call (bounds memory: each holds a full copy of the variables).
  # vectorized=False evaluates one variant at a time. Measure both on your
  # hardware with benchmarks/analysis_vectorized.py: on the 2-core CPU the
  # vmapped path was 1.5-2.3x faster for the tiny model but 0.6-0.7x for demo.
  analysis.variants_per_call = a.variants
  analysis.vectorized = True
  # Stability: workdirs of other runs (seeds, sizes, batch vs group norm)
  # whose analysis/importance.json already exists; compared with this run.
  analysis.compare_workdirs = ()
  return config
