"""Which federated runs the claim-5 test makes, and where each lives.

A run is (arm, cost level, pre-trained model, federated seed, client
learning rate). With M pre-trained models (`config.pretrain_seeds`) and the
arms of `experiment/arms.py` at every cost level of `config.comparison`:

  tuning   every base arm (random draws share random_0's pick) at the
           verdict's level, on model 0 with the first verdict seed, once per
           client learning rate of `comparison.lr_grid`; each arm's rate is
           the one with the lowest final dev WER (the same grid and the same
           budget for every arm). With one rate in the grid there is no
           tuning stage.
  final    every arm at every level on every model, at its picked rate:
           full, targeted and anti_targeted at the verdict level (the
           verdict's arms) with `comparison.verdict_seeds`, the other arms
           at the verdict level (and freeze; the controls, among them the
           policy arms uniform_ordered / _static / _rolling, each tuned on
           its own) with `comparison.control_seeds`,
           every arm at the other levels with `comparison.level_seeds`. The tuning run of
           the picked rate is the final run of its seed (same directory).

Directory of a run: W/arms/model_M/LEVEL/ARM/seed_S_lrR, LEVEL 'c070' for a
cost level of 0.70 and 'any' for full and freeze; of pre-trained model M:
W/pretrain (M = 0), W/pretrain_modelM.
"""

from collections.abc import Mapping, Sequence
import dataclasses

from etils import epath

VERDICT_ARMS = ("full", "targeted", "anti_targeted")


def pretrain_dir(workdir: epath.Path, model: int) -> epath.Path:
  """W/pretrain for the first pre-trained model, W/pretrain_modelM after."""
  return epath.Path(workdir) / ("pretrain" if model == 0
                                else f"pretrain_model{model}")


def level_name(level: float | None) -> str:
  """'c070' for 0.70; 'any' for None (full, freeze)."""
  return "any" if level is None else f"c{round(100 * level):03d}"


def base_arm(arm: str) -> str:
  """'random' for 'random_2'; the arm itself otherwise."""
  return "random" if arm.startswith("random_") else arm


@dataclasses.dataclass(frozen=True)
class Run:
  """One federated run of the test."""
  arm: str
  level: float | None
  model: int
  seed: int
  lr: float

  def path(self, workdir: epath.Path) -> epath.Path:
    return (epath.Path(workdir) / "arms" / f"model_{self.model}" /
            level_name(self.level) / self.arm / f"seed_{self.seed}_lr{self.lr:g}")


def tuning_arm(arm: str) -> str:
  """The arm whose learning-rate pick `arm` uses (random_D: random_0)."""
  return "random_0" if arm.startswith("random_") else arm


def tuning_runs(specs: Sequence[tuple[str, float | None]],
                verdict_level: float, lr_grid: Sequence[float],
                seed: int) -> list[Run]:
  """The tuning runs (module docstring) of model 0's (arm, level) pairs."""
  if len(lr_grid) < 2:
    return []
  arms = []
  for arm, level in specs:
    if tuning_arm(arm) == arm and level in (None, verdict_level) and (
        arm not in arms):
      arms.append(arm)
  level_of = dict(specs)
  return [Run(arm, None if level_of.get(arm, verdict_level) is None
              else verdict_level, 0, seed, lr)
          for arm in arms for lr in lr_grid]


def pick_learning_rates(dev_wer: Mapping[Run, float],
                        lr_grid: Sequence[float]) -> dict[str, float]:
  """{tuning arm: the grid rate of lowest dev WER} (the first rate on ties)."""
  if len(lr_grid) < 2:
    return {}
  by_arm: dict[str, list[tuple[float, float]]] = {}
  for run, wer in dev_wer.items():
    by_arm.setdefault(run.arm, []).append((wer, list(lr_grid).index(run.lr)))
  return {arm: lr_grid[min(values)[1]] for arm, values in by_arm.items()}


def final_runs(specs_by_model: Sequence[Sequence[tuple[str, float | None]]],
               verdict_level: float, verdict_seeds: Sequence[int],
               control_seeds: Sequence[int], level_seeds: Sequence[int],
               lr_grid: Sequence[float],
               picks: Mapping[str, float]) -> list[Run]:
  """The final runs (module docstring); specs_by_model[m]: model m's pairs."""
  runs = []
  for model, specs in enumerate(specs_by_model):
    for arm, level in specs:
      if level not in (None, verdict_level):
        seeds = level_seeds
      elif arm in VERDICT_ARMS:
        seeds = verdict_seeds
      else:
        seeds = control_seeds
      lr = picks.get(tuning_arm(arm), lr_grid[0])
      runs.extend(Run(arm, level, model, seed, lr) for seed in seeds)
  return runs


def validate(comparison, pretrain_seeds: Sequence[int]) -> None:
  """Checks config.comparison; ValueError naming the bad field."""
  c = comparison
  if not c.levels or any(not 0.0 < x < 1.0 for x in c.levels):
    raise ValueError(f"config.comparison.levels={tuple(c.levels)}: give cost"
                     " levels in (0, 1), fractions of the full client's"
                     " parameters.")
  if c.verdict_level not in tuple(c.levels):
    raise ValueError(f"config.comparison.verdict_level={c.verdict_level} is not"
                     f" one of config.comparison.levels={tuple(c.levels)}.")
  if not c.verdict_seeds:
    raise ValueError("config.comparison.verdict_seeds is empty: name at least"
                     " one federated seed.")
  for field in ("control_seeds", "level_seeds"):
    if not c[field] or not set(c[field]) <= set(c.verdict_seeds):
      raise ValueError(f"config.comparison.{field}={tuple(c[field])} must be"
                       " a non-empty subset of verdict_seeds="
                       f"{tuple(c.verdict_seeds)} (the arms pair by seed).")
  if not c.lr_grid or any(x <= 0 for x in c.lr_grid):
    raise ValueError(f"config.comparison.lr_grid={tuple(c.lr_grid)}: give"
                     " positive client learning rates.")
  if not c.margin > 0:
    raise ValueError(f"config.comparison.margin={c.margin}: the"
                     " non-inferiority margin must be > 0.")
  if not 0.0 < c.max_rate < 1.0:
    raise ValueError(f"config.comparison.max_rate={c.max_rate}: must be in"
                     " (0, 1).")
  if not pretrain_seeds:
    raise ValueError("config.pretrain_seeds is empty: give at least one.")
