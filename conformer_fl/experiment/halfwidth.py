"""Module importance under random half width, without retraining.

Reset-to-init robustness (what the analysis calls ambient) and robustness to
losing units (what Federated Dropout applies) are different interventions.
This ranks the droppable modules by the second: for each module, half of its
units (hidden units, channels or heads) chosen at random are silenced by
zeroing their rows of the module's output leaf
(`DroppableModule.output`), the rest of the model kept as trained, and the
dev WER measured on the analysis's batches. For the feed-forward and
attention modules this is exactly the sub-model's forward pass (the units'
other weights no longer reach the output); for the conv module the norm's
statistics still see every channel. `agreement` compares the ranking with the
reset ranking (Spearman over the droppable modules).
"""

from collections.abc import Mapping, Sequence
import itertools
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from conformer_fl import models
from conformer_fl import tree_paths
from conformer_fl import workdir as workdir_lib
from conformer_fl.analysis import importance as importance_lib
from conformer_fl.analysis import importance_file
from conformer_fl.analysis import variant_eval
from conformer_fl.data import input_pipeline
from conformer_fl.federated import dropout as federated_dropout


def silenced(params: Any, module: str, output: str, num_units: int,
             rng: np.random.Generator, fraction: float = 0.5) -> Any:
  """`params` with round(fraction * n) random units of `module` silenced.

  Args:
    params: the model's params.
    module: the module's '/'-joined path, e.g. 'encoder/block_03/ffn1'.
    output: its output leaf below the module (units along axis 0).
    num_units: n.
    rng: draws the units.
    fraction: the share of units silenced.
  """
  drop = rng.permutation(num_units)[:int(round(fraction * num_units))]
  path = tuple(module.split("/")) + tuple(output.split("/"))
  leaf = np.array(tree_paths.get(params, path))
  leaf[drop] = 0.0
  return tree_paths.replace(params, path, leaf)


def evaluate_half_width(workdir: str, analysis: Any, draws: int, seed: int,
                        trained: Mapping[str, Any]) -> dict[str, Any]:
  """Dev WER of the trained model with each droppable module at half width.

  Evaluates on this process alone (no collective): every process may call it,
  or one process for all.

  Args:
    workdir: the pre-trained run (its analysis has run).
    analysis: the analysis config section (`config.analysis.analysis`): its
      batches, split and domains are used, so the WERs pair with the resets'.
    draws: random halvings per module (their WERs are averaged).
    seed: the draws' seed.
    trained: the run's variables at the analysed step (host arrays).

  Returns:
    {'baseline_wer', 'draws', 'modules': {module: {'wer', 'wer_increase'}}}.
  """
  run_config = workdir_lib.Workdir(workdir).config()
  model = models.build_model(run_config.model)
  tokenizer = input_pipeline.get_tokenizer(run_config.data, workdir)
  layers = federated_dropout.droppable_layers(
      trained["params"], None,
      models.droppable_modules_from_config(run_config.model))
  data_config = importance_lib.data_config_of(run_config, analysis)
  batches = input_pipeline.get_eval_batches(data_config, tokenizer)
  if analysis.eval_max_batches:
    batches = itertools.islice(batches, analysis.eval_max_batches)
  batches = list(batches)
  rng = np.random.default_rng(seed)
  variants = [(name, declaration.output, num_units, rng.spawn(1)[0])
              for name, (declaration, num_units, _, _) in layers.items()
              for _ in range(draws)]

  def get_variables(index: int):
    name, output, num_units, draw_rng = variants[index]
    return {**trained, "params": silenced(trained["params"], name, output,
                                          num_units, draw_rng)}

  metrics = variant_eval.evaluate_one_at_a_time(
      variant_eval.make_single_eval_fn(model),
      lambda i: trained if i == len(variants) else get_variables(i),
      len(variants) + 1, batches, tokenizer.decode)
  baseline = metrics[-1]["wer"]
  modules = {}
  for name in layers:
    wers = [m["wer"] for (n, *_), m in zip(variants, metrics) if n == name]
    modules[name] = dict(wer=float(np.mean(wers)),
                         wer_increase=float(np.mean(wers)) - baseline)
  return dict(baseline_wer=baseline, draws=draws, modules=modules)


def agreement(half_width: Mapping[str, Any],
              importance: importance_file.Importance,
              modules: Sequence[str]) -> dict[str, Any]:
  """Spearman correlation of the half-width and reset WER increases.

  Returns:
    {'spearman', 'pvalue' (None when a ranking is constant), 'num_modules',
    'same_least_important': how many
    of the k least important modules (k = a quarter of them) the two
    rankings share, 'k'}.
  """
  half = np.array([half_width["modules"][m]["wer_increase"] for m in modules])
  reset = np.array([importance.units[m].wer_increase for m in modules])
  k = max(1, len(modules) // 4)
  least = lambda x: set(np.argsort(x, kind="stable")[:k].tolist())
  rho = p = None  # Undefined when either ranking is constant.
  if np.ptp(half) > 0 and np.ptp(reset) > 0:
    rho, p = (float(x) for x in scipy_stats.spearmanr(half, reset))
  return dict(spearman=rho, pvalue=p, num_modules=len(modules),
              same_least_important=len(least(half) & least(reset)), k=k)
