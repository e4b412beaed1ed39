"""The notebooks in colabs/: stored clean, and executed end to end.

Each notebook runs in a fresh ipykernel of this interpreter (a kernelspec made
in a temporary directory, so no user-installed kernel is picked up), with this
session's environment: conftest's XLA_FLAGS (4 CPU devices) and persistent
compilation cache apply in the kernel too. Notebook 2 is pointed at the
session's prebuilt tiny corpus and a temporary workdir through its parameter
environment variables. Its model, data and analysis settings are those of
tests/test_analysis_known_answer.py, so in a full run, after that test, the
kernel finds most of its compiled programs in the session's cache (measured:
35 s instead of 98 s on the loaded 2-core machine). Notebook 3 reuses the tiny
experiment's workdir, so its test lives beside the experiment's, in
tests/test_experiment_e2e.py. Notebook 1 runs a second time as on a fresh
Colab runtime: in a virtualenv without conformer_fl, whose setup cell installs
it from a copy of the checkout (measured: 24 s after the first run, 33 s
alone). The Debian-package cell of notebooks 2 and 3 runs against a fake
apt-get; their parameter cell runs in a temporary working directory (with and
without a checkout), and `device_fit`, which fits their configs to the
runtime's devices, is checked at device counts that the configs' 4 clients or
batch of 8 do not divide.
"""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

from IPython.core import inputtransformer2
import nbformat
import pytest

import notebooks  # tests/notebooks.py

NOTEBOOKS = sorted(notebooks.COLABS.glob("*.ipynb"))


def test_the_notebooks_run_here_exist():
  assert {"01_conformer_model.ipynb", "02_layer_importance.ipynb",
          "03_targeted_federated_dropout.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert code_cells
  for index, cell in enumerate(code_cells):
    assert cell.outputs == [], f"code cell {index} of {path.name} has outputs"
    assert cell.execution_count is None, (
        f"code cell {index} of {path.name} has an execution_count")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_imports_and_never_redefines(path):
  nb = nbformat.read(path, as_version=4)
  sources = [c.source for c in nb.cells if c.cell_type == "code"]
  # The first code cell installs the package when it is not importable, from
  # CONFORMER_FL_SOURCE, and is valid IPython (the %pip magic included).
  setup = sources[0]
  assert "SPEC.origin is None:" in setup and "CONFORMER_FL_SOURCE" in setup
  python = inputtransformer2.TransformerManager().transform_cell(setup)
  assert "get_ipython().run_line_magic('pip', 'install -q \"{SOURCE}\"')" in (
      python)
  compile(python, path.name, "exec")
  # Model code and configs come from the package and configs/.
  for source in sources:
    assert not re.search(r"^\s*class\s", source, re.MULTILINE), source
    assert "def get_config" not in source and "nn.Module" not in source


CORPUS_NOTEBOOKS = [p for p in NOTEBOOKS if p.name.startswith(("02_", "03_"))]


def _code_cell_with(path: pathlib.Path, marker: str) -> str:
  """The one code cell of notebook `path` whose source contains `marker`."""
  nb = nbformat.read(path, as_version=4)
  cells = [c.source for c in nb.cells
           if c.cell_type == "code" and marker in c.source]
  assert len(cells) == 1, (path.name, marker, len(cells))
  return cells[0]


def _apt_cell(path: pathlib.Path) -> str:
  """The code cell of a corpus notebook that installs the Debian packages."""
  return _code_cell_with(path, "missing_system_packages")


@pytest.mark.parametrize("path", CORPUS_NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("euid", [0, 1000], ids=["root", "user"])
def test_corpus_notebook_installs_missing_debian_packages(
    path, euid, monkeypatch, capsys):
  """The apt cell, run with a fake apt-get: it installs only what is missing."""
  from conformer_fl.data import tts_engines  # pylint: disable=g-import-not-at-top

  cell = _apt_cell(path)
  assert cell == _apt_cell(CORPUS_NOTEBOOKS[0])  # The same cell in 02 and 03.
  python = inputtransformer2.TransformerManager().transform_cell(cell)
  assert python.strip() == cell.strip()  # Plain Python: no shell escapes.
  installed = {"espeak-ng", "flite", "bible"}
  calls = []

  def fake_run(argv, capture_output, text, env):
    assert capture_output and text
    calls.append((argv, env["DEBIAN_FRONTEND"]))
    if "install" in argv:
      installed.update(argv[argv.index("-qq") + 1:])
    return subprocess.CompletedProcess(argv, 0, "", "")

  monkeypatch.setattr(subprocess, "run", fake_run)
  monkeypatch.setattr(os, "geteuid", lambda: euid)
  monkeypatch.setattr(tts_engines.shutil, "which",
                      lambda cmd: f"/usr/bin/{cmd}" if cmd in installed else None)
  everything = "espeak-ng flite fortunes-min fortunes bible-kjv"
  # All present (the fortunes files are those of this machine): no apt-get.
  exec(python, {"os": os})  # pylint: disable=exec-used
  assert calls == []
  assert capsys.readouterr().out == f"Debian packages installed: {everything}\n"

  # flite missing: apt-get update, then install of flite alone.
  installed.discard("flite")
  exec(python, {"os": os})  # pylint: disable=exec-used
  sudo = [] if euid == 0 else ["sudo"]
  assert calls == [
      ([*sudo, "apt-get", "update", "-qq"], "noninteractive"),
      ([*sudo, "apt-get", "install", "-y", "-qq", "flite"], "noninteractive")]
  assert capsys.readouterr().out == (
      f"apt-get install flite\nDebian packages installed: {everything}\n")

  # apt-get fails: its output is in the error.
  installed.discard("flite")
  monkeypatch.setattr(subprocess, "run", lambda argv, **kwargs: (
      subprocess.CompletedProcess(argv, 100, "", "E: Unable to locate package")))
  with pytest.raises(RuntimeError, match="apt-get update -qq failed:\n"
                     "E: Unable to locate package"):
    exec(python, {"os": os})  # pylint: disable=exec-used
  # apt-get succeeds but the package is still missing.
  monkeypatch.setattr(subprocess, "run", lambda argv, **kwargs: (
      subprocess.CompletedProcess(argv, 0, "", "")))
  with pytest.raises(RuntimeError, match=r"Still missing .*\['flite'\]"):
    exec(python, {"os": os})  # pylint: disable=exec-used


@pytest.mark.slow
def test_01_conformer_model_runs(tmp_path):
  nb = notebooks.execute(notebooks.COLABS / "01_conformer_model.ipynb",
                         tmp_path)
  _check_01_outputs(nb)


@pytest.mark.slow
def test_01_installs_the_package_on_a_fresh_runtime(tmp_path):
  """Notebook 1 where conformer_fl is not installed, as on a fresh Colab.

  The runtime has the dependencies but not the package: a virtualenv of the
  base interpreter whose site-packages links each entry of this environment's
  except conformer_fl's own files (its editable install). The checkout is
  copied to content/conformer_fl, as a clone in Colab's /content, and the
  kernel runs in content/ with no CONFORMER_FL_* variable: the setup cell
  finds the checkout and pip-installs CHECKOUT[study] into the virtualenv,
  offline (no index, no pip configuration file) and without build isolation
  (setuptools of the environment); every dependency is already there.
  """
  env_dir = tmp_path / "runtime"
  base_python = sys._base_executable  # pylint: disable=protected-access
  subprocess.run([base_python, "-m", "venv", "--without-pip", str(env_dir)],
                 check=True)
  python = str(env_dir / "bin" / "python")
  site = pathlib.Path(subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
      check=True, capture_output=True, text=True).stdout.strip())
  own = {pathlib.PurePath(f).parts[0]
         for f in importlib.metadata.distribution("conformer_fl").files}
  own |= {"conformer_fl", "__pycache__"}
  for entry in pathlib.Path(sysconfig.get_path("purelib")).iterdir():
    # The editable install's .pth, finder and dist-info name the package:
    # whichever distribution importlib.metadata found, none is linked.
    if entry.name not in own and "conformer_fl" not in entry.name:
      (site / entry.name).symlink_to(entry)
  content = tmp_path / "content"
  checkout = content / "conformer_fl"
  ignore = shutil.ignore_patterns("__pycache__")
  for name in ("conformer_fl", "configs"):
    shutil.copytree(notebooks.ROOT / name, checkout / name, ignore=ignore)
  shutil.copy(notebooks.ROOT / "setup.py", checkout)

  env = {k: v for k, v in os.environ.items()
         if k != "PYTHONPATH" and not k.startswith(("PIP_", "CONFORMER_FL_"))}
  env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull,
             PIP_NO_BUILD_ISOLATION="0")  # "0": build isolation off.
  # Before: the package is not importable; from content/ the checkout's
  # directory is a namespace package (no __file__), not the package.
  probe = ("import importlib.util; spec = importlib.util.find_spec("
           "'conformer_fl'); print(spec and (spec.origin or 'namespace'))")
  before = [subprocess.run([python, "-c", probe], cwd=cwd, env=env,
                           check=True, capture_output=True,
                           text=True).stdout.strip()
            for cwd in (tmp_path, content)]
  assert before == ["None", "namespace"]

  nb = notebooks.execute(notebooks.COLABS / "01_conformer_model.ipynb",
                         tmp_path, python=python, cwd=content, base_env=env)
  setup = notebooks.text(next(c for c in nb.cells if c.cell_type == "code"))
  assert f"conformer_fl from {site / 'conformer_fl'}\n" in setup, setup
  # A regular install, configs/ included (as conformer_fl.configs).
  assert (site / "conformer_fl" / "configs" / "central.py").is_file()
  assert not (site / "conformer_fl").is_symlink()
  _check_01_outputs(nb)


def _check_01_outputs(nb) -> None:
  """Notebook 1's printed numbers and its figure."""
  text = notebooks.all_text(nb)
  # Log-mel: 98 frames of 80 bins; 58 valid frames in the 0.6 s utterance.
  assert "features (2, 98, 80) frame paddings (2, 98)" in text
  assert "valid frames per utterance: [98. 58.]" in text
  # Forward pass: 98 -> 25 encoder frames; 10 of them padded in utterance 1.
  assert re.search(r"logits \(2, 25, 32\)", text)
  assert re.search(r"encoded \(2, 25, 32\)", text)
  assert "padded encoder frames: [ 0. 10.]" in text
  assert "encoder output at padded frames is zero: True" in text
  assert "CTC loss per utterance: [" in text
  assert "greedy ids of the untrained model: (2, 25)" in text
  difference = re.search(r"with noise in the padding: (\S+)", text).group(1)
  assert float(difference) == 0.0
  # Parameter counts of RNN-T models, from shapes only.
  counts = notebooks.text(notebooks.cell_printing(nb, "blocks x width"))
  expected = {
      "tiny": ("2 x 32", 2, 32, "94,208", ""),
      "demo": ("4 x 96", 4, 256, "1,396,992", ""),
      "S": ("16 x 144", 4, 1024, "10,336,512", "10.3M"),
      "M": ("16 x 256", 4, 1024, "30,731,072", "30.7M"),
      "L": ("17 x 512", 8, 1024, "118,596,928", "118.8M"),
  }
  for size, (shape, heads, vocab, count, paper) in expected.items():
    pattern = (rf"^{size}\s+{shape}\s+{heads}\s+{vocab}\s+{count}\s*"
               rf"{re.escape(paper)}$")
    assert re.search(pattern, counts, re.MULTILINE), (size, counts)
  # Units: 4 at block granularity, 12 at module granularity (2 blocks x 5 + 2).
  assert "tiny (CTC), block granularity: 4 units" in text
  assert "tiny (CTC), module granularity: 12 units" in text
  assert "  encoder/block_01/final_norm" in text
  assert "S (RNN-T), block granularity: 18 units, 10,336,512 parameters" in text
  # The log-mel figure.
  assert [png[:8] for png in notebooks.pngs(nb)] == [notebooks.PNG_MAGIC]


@pytest.mark.slow
def test_02_layer_importance_runs(tmp_path, tiny_corpus_dir):
  workdir = tmp_path / "run"
  nb = notebooks.execute(notebooks.COLABS / "02_layer_importance.ipynb",
                         tmp_path, CONFORMER_FL_WORKDIR=str(workdir),
                         CONFORMER_FL_DATA_DIR=tiny_corpus_dir,
                         CONFORMER_FL_STEPS="4")
  text = notebooks.all_text(nb)
  assert f"WORKDIR={workdir}\n" in text
  assert f"CONFIGS={notebooks.ROOT / 'configs'}\n" in text
  # The Debian packages are installed here: the apt cell runs no apt-get.
  assert "Debian packages installed: espeak-ng flite" in text
  assert "apt-get install" not in text
  metrics = [json.loads(line) for line in
             (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == [2, 4]

  importance = json.loads(
      (workdir / "analysis" / "importance.json").read_text())
  units = list(importance["units"])
  assert units == ["encoder/subsampling"] + [
      f"encoder/block_00/{m}" for m in
      ("ffn1", "mhsa", "conv", "ffn2", "final_norm")] + ["decoder"]
  ambient, critical = importance["ambient"], importance["critical"]
  undetermined = importance["undetermined"]
  assert sorted(ambient + critical + undetermined) == sorted(units)
  assert not set(ambient) & set(critical)
  # The frozen unit is the known answer: ambient, loss increase exactly 0.
  frozen = importance["units"]["encoder/block_00/ffn2"]
  assert frozen["ambient"] and frozen["loss_increase"] == 0.0
  assert importance["taus"] == [0, 2, 4]
  assert f"ambient:  {ambient}" in text and f"critical: {critical}" in text
  assert f"undetermined: {undetermined}" in text
  # The frozen unit's reset changes no utterance: its interval is [0, 0].
  assert "+0.000 (+0.000, +0.000)" in text
  assert "encoder/block_00/ffn2: ambient=True, loss increase=0.0" in text

  # The two heatmaps are shown, and they are the PNGs the pass wrote.
  pngs = notebooks.pngs(nb)
  assert len(pngs) == 2
  assert all(png[:8] == notebooks.PNG_MAGIC for png in pngs)
  assert pngs == [(workdir / "analysis" / name).read_bytes()
                  for name in ("heatmap_wer.png", "heatmap_loss.png")]


def _load_config(name: str, arg: str):
  """configs/NAME.py's get_config(arg), as the notebooks load it."""
  path = notebooks.ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_device_fit_picks_a_batch_split_and_clients_per_round():
  from conformer_fl import device_fit  # pylint: disable=g-import-not-at-top

  # The most devices, at most the runtime's, that a batch of 8 divides over.
  assert [device_fit.central_devices(8, n) for n in (1, 2, 3, 4, 6, 8, 16)] == [
      1, 2, 2, 4, 4, 8, 8]
  # The smallest multiple of the devices >= 4, at most 8 clients.
  assert [device_fit.clients_per_round(4, n, 8) for n in (1, 2, 3, 4, 8)] == [
      4, 4, 6, 4, 8]
  assert device_fit.clients_per_round(4, 5, None) == 5
  with pytest.raises(ValueError, match=r"multiple of the 16 devices, 16, but "
                     r"the corpus has 8 clients: run on a runtime with at most "
                     r"8 devices"):
    device_fit.clients_per_round(4, 16, 8)
  with pytest.raises(ValueError, match="must be positive"):
    device_fit.central_devices(8, 0)


@pytest.mark.parametrize("devices, clients, pretrain_devices, changed", [
    (1, 4, 0, 0), (4, 4, 0, 0), (3, 6, 2, 2), (6, 6, 4, 2), (8, 8, 0, 1)])
def test_device_fit_fits_notebook_3s_experiment(devices, clients,
                                                pretrain_devices, changed):
  """configs/experiment.py:scale=tiny (4 clients a round, batch 8) on N devices."""
  from conformer_fl import device_fit  # pylint: disable=g-import-not-at-top
  from conformer_fl import preflight  # pylint: disable=g-import-not-at-top

  config = _load_config("experiment", "scale=tiny")
  assert config.adapt.federated.clients_per_round == 4
  assert config.pretrain.data.batch_size == 8
  assert device_fit.corpus_clients(config.adapt.data) == 8
  lines = device_fit.fit_config(config, devices)
  assert len(lines) == changed, lines
  assert config.adapt.federated.clients_per_round == clients
  assert config.pretrain.central.num_devices == pretrain_devices
  # What the experiment's preflight and central training then accept.
  preflight.check_clients_divide(clients, "adapt.federated.clients_per_round",
                                 devices)
  assert 8 % (pretrain_devices or devices) == 0
  if clients != 4:
    assert (f"adapt.federated.clients_per_round={clients} (the config's 4 do"
            f" not divide over the {devices} devices)") in lines
  if pretrain_devices:
    assert (f"pretrain.central.num_devices={pretrain_devices}:"
            f" data.batch_size=8 divides over {pretrain_devices} of the"
            f" {devices} devices") in lines


def test_device_fit_fits_notebook_2s_central_run():
  from conformer_fl import device_fit  # pylint: disable=g-import-not-at-top

  arg = "size=tiny,corpus=tiny,norm=batch_norm,domain=all,steps=4"
  config = _load_config("central", arg)
  assert device_fit.fit_config(config, 4) == []
  assert config.central.num_devices == 0
  assert device_fit.fit_config(config, 3) == [
      "central.num_devices=2: data.batch_size=8 divides over 2 of the 3"
      " devices"]
  # A num_devices above the runtime's devices is brought down to them.
  config = _load_config("central", arg)
  config.central.num_devices = 8
  assert device_fit.fit_config(config, 4) == [
      "central.num_devices=4: data.batch_size=8 divides over 4 of the 4"
      " devices"]
  # The federated config: 8 clients a round, the tiny corpus's 8 speakers.
  config = _load_config("federated", "size=tiny,corpus=tiny")
  assert config.federated.clients_per_round == 8
  assert device_fit.fit_config(config, 8) == []
  assert device_fit.fit_config(config, 4) == []
  # 3 devices need 9 clients; the corpus has 8.
  with pytest.raises(ValueError, match="but the corpus has 8 clients"):
    device_fit.fit_config(config, 3)
  assert config.federated.clients_per_round == 8


def _parameters_cell(path: pathlib.Path) -> str:
  """The code cell of a corpus notebook that sets WORKDIR and CONFIGS."""
  return _code_cell_with(path, "WORKDIR =")


@pytest.mark.parametrize("path", CORPUS_NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("checkout", [True, False], ids=["checkout", "none"])
def test_corpus_notebook_parameters(path, checkout, tmp_path, monkeypatch,
                                    capsys):
  """Runs under the working directory, configs from a checkout or the package."""
  from conformer_fl import cli  # pylint: disable=g-import-not-at-top

  for name in ("CONFORMER_FL_WORKDIR", "CONFORMER_FL_DATA_DIR",
               "CONFORMER_FL_STEPS"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.chdir(tmp_path)
  repo = notebooks.ROOT if checkout else None
  scope = {"os": os, "find_checkout": lambda: repo}
  exec(_parameters_cell(path), scope)  # pylint: disable=exec-used
  run = "central" if path.name.startswith("02_") else "experiment"
  assert scope["WORKDIR"] == str(tmp_path / "conformer_fl_colab" / run)
  assert scope["DATA_DIR"] == str(tmp_path / "conformer_fl_colab" / "tfds")
  configs = (notebooks.ROOT / "configs" if checkout
             else cli.packaged_configs_dir())
  assert scope["CONFIGS"] == configs
  assert (configs / "central.py").is_file()
  out = capsys.readouterr().out
  assert f"WORKDIR={tmp_path}/conformer_fl_colab/{run}\n" in out
  assert f"CONFIGS={configs}" in out
  # Nothing was written: the directories are made by the run.
  assert list(tmp_path.iterdir()) == []
  # The notebook fits its config to the runtime's devices before running it.
  nb = nbformat.read(path, as_version=4)
  assert "device_fit.fit_config(config, jax.device_count())" in "".join(
      c.source for c in nb.cells if c.cell_type == "code")
