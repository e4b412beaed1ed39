"""Installs conformer_fl: federated Conformer ASR and layer-importance analysis in JAX."""

import setuptools

INSTALL_REQUIRES = [
    "absl-py>=2.1",
    "clu>=0.0.12",
    "etils[epath]>=1.7",
    "flax>=0.10.4",
    "jax>=0.5.3",
    "jiwer>=3.0.4",
    "matplotlib>=3.8",
    "ml-collections>=0.1.1",
    "numpy>=1.26",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "scipy>=1.11",
    "sentencepiece>=0.2.0",
    "tensorflow-cpu>=2.16",
    "tensorboard>=2.16",
    "tensorflow-datasets>=4.9.7",
    "tqdm>=4.66",
]

EXTRAS_REQUIRE = {
    "dev": [
        "filelock>=3.12",
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
    packages=setuptools.find_packages(include=["conformer_fl", "conformer_fl.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
