"""The model, the federated round and its benchmark run without TensorFlow.

`pip install conformer_fl` (setup.py's base requirements) has no TensorFlow:
a subprocess where importing tensorflow or tensorflow_datasets fails imports
the model, the round, the configs and a tokenizer module, runs a Conformer
forward pass and one measurement of benchmarks/round_throughput.py, imports
benchmarks/tiered_round.py, and reports the modules it loaded. Also checked: what setup.py installs (its
extras and the packaged configs) and the lock file's pins.
"""

import json
import pathlib
import re
import subprocess
import sys

import xla_env  # tests/xla_env.py

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys

class _NoTensorFlow:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
      raise ImportError(f"{name} is not installed (blocked by the test)")
    return None

sys.meta_path.insert(0, _NoTensorFlow())

import jax
import numpy as np
from conformer_fl import cli, config_lib, models
from conformer_fl.data import tokenizer
from conformer_fl.federated import fl_round as round_lib
from benchmarks import round_throughput
from benchmarks import tiered_round

config = cli.load_config_file("configs/federated.py:size=tiny")
model_config = config.model.copy_and_resolve_references()
model_config.vocab_size = 8
model = models.build_model(model_config)
variables = models.init_variables(model, 0)
audio = np.random.default_rng(0).normal(0, 0.1, (2, 16000)).astype(np.float32)
labels = np.ones((2, 4), np.int32)
outputs = model.apply(variables, audio, np.zeros((2, 16000), np.float32),
                      labels, np.zeros((2, 4), np.float32), train=False)
args = round_throughput.parse_args([
    "--model=toy", "--clients=2", "--local_steps=1", "--batch=2",
    "--repeats=1", "--toy_dim=8", "--toy_hidden=8", "--matmul_size=64",
    "--worker_devices=1"])
result = round_throughput.run_worker(args)
print("RESULT " + json.dumps({
    "tensorflow_modules": sorted(m for m in sys.modules
                                 if m.startswith("tensorflow")),
    "chars": tokenizer.CharTokenizer().vocab_size,
    "logits_shape": list(outputs["logits"].shape),
    "max_param_difference": result["max_param_difference"],
    "tiers": tiered_round.parse_tiers("0.5:1.0,0.5:0.5"),
}))
"""


def test_model_round_and_benchmark_import_and_run_without_tensorflow():
  result = subprocess.run(
      [sys.executable, "-c", _SCRIPT], cwd=ROOT,
      env=xla_env.subprocess_env(1, PYTHONPATH=str(ROOT)),
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")][-1]
  report = json.loads(line[len("RESULT "):])
  assert report["tensorflow_modules"] == []
  assert report["chars"] > 26
  # CTC logits [B, T', V]: 1 s of audio is 25 encoder frames.
  assert report["logits_shape"] == [2, 25, 8]
  assert report["max_param_difference"] < 1e-6
  # benchmarks/tiered_round.py imports (and parses its flags' tiers) too.
  assert report["tiers"] == [[0.5, 1.0], [0.5, 0.5]]


def _setup_py() -> str:
  return (ROOT / "setup.py").read_text()


def test_the_base_install_is_the_model_alone():
  text = _setup_py()
  base = re.search(r"INSTALL_REQUIRES = \[(.*?)\]", text, re.S).group(1)
  names = sorted(re.findall(r'"([a-z_-]+)', base))
  assert names == ["absl-py", "flax", "jax", "ml-collections", "numpy", "optax"]
  assert '"tpu-plan": ["jax[tpu]"]' in text
  # libtpu is named by the tpu-plan extra only.
  assert text.count("jax[tpu]") == 1 and "libtpu" not in base


def _lock_entries(name: str) -> dict[str, list[str]]:
  """{package: [sha256, ...]} of a lock file (`pkg==v \\` then `--hash=` lines)."""
  text = (ROOT / name).read_text()
  entries = {}
  for entry in re.split(r"(?<!\\)\n", text):
    entry = entry.strip()
    if not entry or entry.startswith("#"):
      continue
    pin = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+) \\\n(.*)", entry, re.S)
    assert pin, entry
    hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", pin.group(3))
    assert hashes, f"{pin.group(1)} has no sha256 hash"
    entries[pin.group(1).lower().replace("_", "-")] = hashes
  return entries


def test_the_lock_file_pins_and_hashes_every_package_and_leaves_out_libtpu():
  pins = _lock_entries("requirements.lock")
  assert len(pins) > 100
  for name in ("jax", "jaxlib", "flax", "optax", "tensorflow-cpu",
               "tensorflow-datasets", "soundfile", "pytest"):
    assert name in pins, name
  assert "libtpu" not in pins
  assert not any("conformer" in n for n in pins)
  assert list(_lock_entries("requirements-tpu-plan.lock")) == ["libtpu"]
  makefile = (ROOT / "Makefile").read_text()
  assert makefile.count("--require-hashes") == 2


def test_configs_are_installed_with_the_package():
  text = _setup_py()
  assert '"conformer_fl.configs": "configs"' in text
  assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
