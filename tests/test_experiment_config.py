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


def test_stages_share_the_data_dir():
  config = _config("scale=tiny,rounds=5")
  config.data_dir = "/somewhere"
  resolved = config.copy_and_resolve_references()
  assert resolved.pretrain.data.data_dir == "/somewhere"
  assert resolved.adapt.data.data_dir == "/somewhere"
  assert config.adapt.federated.rounds == 5
  assert config.pretrain.data.train_domains == ("long",)
  assert config.adapt.data.client_domains == ("short",)
  assert config.adapt.data.eval_domains == ("short",)


def test_study_is_the_test_and_the_demo_its_miniature():
  study, demo = _config("scale=study"), _config("scale=demo")
  for config in (study, demo):
    experiment.validate_config(config)
    assert config.pretrain.model.num_blocks == 8
    assert config.pretrain.model.model_dim == 64
    assert config.adapt.federated.clients_per_round >= 8
    assert config.comparison.margin == 0.02
    assert config.comparison.verdict_level in config.comparison.levels
    assert not config.stability.runs
  c = study.comparison
  assert len(study.pretrain_seeds) >= 2 and len(c.verdict_seeds) >= 5
  assert c.levels == (0.85,) and c.lr_grid == (0.2,)
  assert c.random_draws == 3
  assert {"anti_targeted", "random", "uniform", "freeze",
          "targeted_rescaled", "uniform_ordered", "uniform_static",
          "uniform_rolling"} <= set(study.arms)
  assert len(demo.pretrain_seeds) == 1 and demo.comparison.levels == (0.85,)
  assert demo.comparison.verdict_level == study.comparison.verdict_level == 0.85
  assert "anti_targeted" in demo.arms
  # The study's larger corpus and longer pre-training; the demo's fit its
  # half hour.
  assert study.pretrain.data.builder_config == "study"
  assert demo.pretrain.data.builder_config == "demo"
  assert (study.pretrain.central.num_steps, demo.pretrain.central.num_steps
          ) == (2400, 1200)
  assert (study.engine_check.steps, demo.engine_check.steps) == (1200, 600)
  # The policy arms are the study's alone.
  policy_arms = {"uniform_ordered", "uniform_static", "uniform_rolling"}
  assert not policy_arms & (set(demo.arms) | set(_config("scale=tiny").arms))
  assert _config("scale=demo,size=demo12x48").adapt.model.num_blocks == 12


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


def test_a_demo_workdir_grows_by_stability_runs(tmp_path, monkeypatch):
  warnings = []
  monkeypatch.setattr(workdir_lib, "warn", warnings.append)
  workdir = epath.Path(tmp_path)
  grown = ("scale=demo,stability_seeds=0+1+2,stability_norms=group_norm"
           "+batch_norm,stability_sizes=demo_deep")
  experiment.check_workdir_config(_config("scale=demo"), workdir)
  experiment.check_workdir_config(_config(grown), workdir)
  # The saved config has the runs now, and nothing was called a change of
  # code version.
  saved = json.loads((workdir / experiment.CONFIG_FILE).read_text())
  assert len(saved["stability"]["runs"]) == 6 and not warnings
  changed = _config(grown)
  changed.stability.runs.demo8x64_batch_norm_seed1.central.peak_learning_rate = 0.1
  with pytest.raises(ValueError, match=r"stability\.runs\.demo8x64_batch_norm_seed1"
                     r"\.central\.peak_learning_rate"):
    experiment.check_workdir_config(changed, workdir)
  # The workdir reruns without them: its report leaves the runs out.
  experiment.check_workdir_config(_config("scale=demo"), workdir)
  assert not json.loads((workdir / experiment.CONFIG_FILE).read_text())[
      "stability"]["runs"] and not warnings


@pytest.mark.parametrize("field,value,message", [
    ("arms", ("full", "dropout"), r"config.arms=\('full', 'dropout'\)"),
    ("arms", ("targeted",), r"expected 'full' and"),
    ("comparison.verdict_level", 0.5, "verdict_level=0.5 is not one of"),
    ("comparison.margin", -0.1, "margin=-0.1"),
    ("pretrain_seeds", (), "config.pretrain_seeds is empty"),
    ("analysis.analysis.granularity", "block", "granularity must be 'module'"),
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


def test_data_dir_may_change_but_nothing_else(tmp_path):
  workdir = epath.Path(tmp_path)
  experiment.check_workdir_config(_config("scale=tiny"), workdir)
  moved = _config("scale=tiny")
  moved.data_dir = "/another/machine/tfds"
  experiment.check_workdir_config(moved, workdir)
