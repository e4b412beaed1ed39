"""Installs conformer_fl: federated Conformer ASR and layer-importance analysis in JAX.

  pip install .               the model, the federated round, the configs
                              (jax, flax, optax, ml-collections; no TensorFlow)
  pip install '.[data]'       + the corpora and tokenizers (TFDS, TensorFlow CPU,
                              sentencepiece), audio files (soundfile) and
                              the batch prefetch thread (grain)
  pip install '.[study]'      + training, checkpoints, analysis, figures: what
                              `python -m conformer_fl.main` runs
  pip install '.[tpu-plan]'   + libtpu, to compile for a TPU pod without one
                              (`launch/tpu_pod.py plan`)
  pip install '.[dev]'        + the study and the test tools

The versions these ranges admit drift; requirements.lock pins the exact
versions (and hashes) that `make demo` and `make test` install.
"""

import setuptools

# The model alone: `import conformer_fl.models`, the federated round.
INSTALL_REQUIRES = [
    "absl-py>=2.1",
    "flax>=0.10.4",
    "jax>=0.5.3",
    "ml-collections>=0.1.1",
    "numpy>=1.26",
    "optax>=0.2.4",
]

DATA = [
    "etils[epath]>=1.7",
    "grain>=0.2.18,<0.3",  # thread prefetch of the training batches
    "sentencepiece>=0.2.0",
    "soundfile>=0.12",
    "tensorflow-cpu>=2.16",
    "tensorflow-datasets>=4.9.7",
]

STUDY = DATA + [
    "clu>=0.0.12",
    "filelock>=3.30",  # the workdir lock (`on_acquired`)
    "jiwer>=3.0.4",
    "matplotlib>=3.8",
    "orbax-checkpoint>=0.11.0",
    "scipy>=1.11",
    "tensorboard>=2.16",
    "tqdm>=4.66",
]

EXTRAS_REQUIRE = {
    "data": DATA,
    "study": STUDY,
    "dev": STUDY + [
        "ipykernel>=6.29",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "pytest>=8.0",
        "pytest-timeout>=2.3",
        "pytest-xdist>=3.5",
    ],
    # `launch/tpu_pod.py plan`: compiling for a TPU topology without a TPU
    # needs libtpu; jax's own `tpu` extra pins the libtpu of the installed
    # jax. With no TPU present JAX falls back to the CPU (see README).
    "tpu-plan": ["jax[tpu]"],
}

setuptools.setup(
    name="conformer_fl",
    version="0.1.0",
    description=(
        "Conformer ASR in JAX/Flax: layer-importance analysis and federated"
        " training with targeted Federated Dropout."
    ),
    license="Apache-2.0",
    # configs/ of the checkout is installed as conformer_fl.configs, so that
    # `--config=configs/NAME.py` works outside a checkout (conformer_fl/cli.py).
    packages=[
        *setuptools.find_packages(include=["conformer_fl", "conformer_fl.*"]),
        "conformer_fl.configs", "conformer_fl.configs.sweeps",
    ],
    package_dir={"conformer_fl.configs": "configs"},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
