"""configs/experiment.py and the experiment's workdir guard."""

import importlib.util
import json
import pathlib

from etils import epath
import pytest

from conformer_fl import experiment
from conformer_fl import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(arg: str = ""):
  spec = importlib.util.spec_from_file_location(
      "experiment_config", ROOT / "configs" / "experiment.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_stages_share_the_data_dir_and_the_seeds_parse():
  config = _config("scale=tiny,seeds=0+3,rounds=5")
  config.data_dir = "/somewhere"
  resolved = config.copy_and_resolve_references()
  assert resolved.pretrain.data.data_dir == "/somewhere"
  assert resolved.adapt.data.data_dir == "/somewhere"
  assert config.seeds == (0, 3)
  assert config.adapt.federated.rounds == 5
  assert config.pretrain.data.train_domains == ("long",)
  assert config.adapt.data.client_domains == ("short",)
  assert config.adapt.data.eval_domains == ("short",)


def test_study_is_the_demo_plus_its_stability_runs():
  study, demo = _config("scale=study"), _config("scale=demo")
  assert not demo.stability.runs
  flat_study = workdir_lib.flatten(workdir_lib.config_as_json(study))
  flat_demo = workdir_lib.flatten(workdir_lib.config_as_json(demo))
  # Every field but the stability runs is the demo's: a `make demo` workdir
  # grows into the study's.
  assert {k for k in flat_study if flat_study[k] != flat_demo.get(k)} <= {
      k for k in flat_study if k.startswith("stability.")}
  runs = study.stability.runs
  assert sorted(runs) == sorted(
      [f"demo_{norm}_seed{seed}" for norm in ("group_norm", "batch_norm")
       for seed in (0, 1, 2)
       if (norm, seed) != ("group_norm", 0)] + ["demo_deep_group_norm_seed0"])
  pretrain = workdir_lib.flatten(workdir_lib.config_as_json(study.pretrain))
  for name, run in runs.items():
    flat = workdir_lib.flatten(workdir_lib.config_as_json(run))
    changed = {k for k in flat if flat[k] != pretrain[k]}
    if name.startswith("demo_deep"):
      assert changed == {"model.num_blocks"} and run.model.num_blocks == 6
    elif "batch_norm" in name:
      assert changed <= {"seed", "model.conv_norm", "model.conv_norm_groups"}
      assert run.model.conv_norm == "batch_norm"
    else:
      assert changed == {"seed"}
    assert run.seed == int(name[-1])
  resolved = study.copy_and_resolve_references()
  study.data_dir = "/somewhere"
  assert study.copy_and_resolve_references().stability.runs[
      "demo_batch_norm_seed2"].data.data_dir == "/somewhere"
  assert resolved.stability.analysis_taus == "0"


def test_stability_runs_from_the_arguments():
  config = _config("scale=tiny,stability_seeds=0+1,stability_norms=batch_norm,"
                   "stability_sizes=demo")
  assert sorted(config.stability.runs) == [
      "demo_group_norm_seed0", "tiny_batch_norm_seed0", "tiny_batch_norm_seed1"]


def test_unknown_scale_is_named():
  with pytest.raises(ValueError, match="scale='huge'"):
    _config("scale=huge")


def test_workdir_of_another_experiment_is_refused(tmp_path):
  workdir = epath.Path(tmp_path)
  experiment.check_workdir_config(_config("scale=tiny"), workdir)
  saved = (workdir / experiment.CONFIG_FILE).read_text()
  experiment.check_workdir_config(_config("scale=tiny"), workdir)  # Same: ok.
  with pytest.raises(ValueError, match=r"adapt\.federated\.rounds"):
    experiment.check_workdir_config(_config("scale=tiny,rounds=7"), workdir)
  assert (workdir / experiment.CONFIG_FILE).read_text() == saved
  assert json.loads(saved)["adapt"]["federated"]["rounds"] == 2


def test_a_demo_workdir_grows_into_the_study(tmp_path, monkeypatch):
  warnings = []
  monkeypatch.setattr(workdir_lib, "warn", warnings.append)
  workdir = epath.Path(tmp_path)
  experiment.check_workdir_config(_config("scale=demo"), workdir)
  experiment.check_workdir_config(_config("scale=study"), workdir)
  # The saved config is the study's now, and nothing was called a change of
  # code version.
  saved = json.loads((workdir / experiment.CONFIG_FILE).read_text())
  assert len(saved["stability"]["runs"]) == 6 and not warnings
  changed = _config("scale=study")
  changed.stability.runs.demo_batch_norm_seed1.central.peak_learning_rate = 0.1
  with pytest.raises(ValueError, match=r"stability\.runs\.demo_batch_norm_seed1"
                     r"\.central\.peak_learning_rate"):
    experiment.check_workdir_config(changed, workdir)
  # A study's workdir reruns as the demo: its report leaves the runs out.
  experiment.check_workdir_config(_config("scale=demo"), workdir)
  assert not json.loads((workdir / experiment.CONFIG_FILE).read_text())[
      "stability"]["runs"] and not warnings


@pytest.mark.parametrize("field,value,message", [
    ("arms", ("full", "dropout"), r"config.arms=\('full', 'dropout'\)"),
    ("seeds", (), "config.seeds is empty"),
    ("targeting.rule", "loudest", "config.targeting.rule='loudest'"),
    ("targeting.targeted_rate", 1.0, r"config.targeting.targeted_rate=1.0"),
    ("adapt.mode", "central", "config.adapt.mode='central'"),
])
def test_bad_experiment_fields_are_named(field, value, message):
  config = _config("scale=tiny")
  *parents, leaf = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    experiment.validate_config(config)


def test_rank_target_count_is_checked_before_any_work():
  config = _config("scale=tiny")  # 2 blocks, module granularity.
  config.targeting.num_units = 9
  with pytest.raises(ValueError, match="num_units=9: expected 1 to 8"):
    experiment.validate_config(config)
  config.targeting.num_units = 8  # 4 droppable modules per block.
  experiment.validate_config(config)
  config.analysis.analysis.granularity = "block"
  config.targeting.num_units = 3
  with pytest.raises(ValueError, match="num_units=3: expected 1 to 2"):
    experiment.validate_config(config)


def test_data_dir_may_change_but_nothing_else(tmp_path):
  workdir = epath.Path(tmp_path)
  experiment.check_workdir_config(_config("scale=tiny"), workdir)
  moved = _config("scale=tiny")
  moved.data_dir = "/another/machine/tfds"
  experiment.check_workdir_config(moved, workdir)
