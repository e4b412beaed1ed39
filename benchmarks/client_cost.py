r"""What one client step of Federated Dropout costs, against the full model.

For each model size and uniform dropout rate (every feed-forward, conv-module and
attention layer), prints the parameters a client optimizes, the FLOPs of one local
step (XLA's cost analysis of the compiled step) and its peak memory (XLA's memory
analysis), each also as a percentage of the full model (rate 0). Nothing is timed,
so the figures do not drift with the load of the machine.

  .venv/bin/python benchmarks/client_cost.py --sizes=tiny,demo --rates=0,0.25,0.5
"""

import argparse

import jax
import numpy as np
import optax

from conformer_fl import config_lib
from conformer_fl import models
from conformer_fl.federated import dropout


def random_batch(vocab_size: int, batch_size: int, seconds: float,
                 num_labels: int) -> dict[str, np.ndarray]:
  """A batch of noise with random labels: [B, S] audio, [B, U] labels."""
  rng = np.random.default_rng(0)
  samples = int(16000 * seconds)
  return {
      "audio": (0.1 * rng.normal(size=(batch_size, samples))).astype(np.float32),
      "audio_paddings": np.zeros((batch_size, samples), np.float32),
      "labels": rng.integers(1, vocab_size, size=(batch_size, num_labels),
                             dtype=np.int32),
      "label_paddings": np.zeros((batch_size, num_labels), np.float32),
      "example_mask": np.ones((batch_size,), np.float32),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="tiny,demo")
  parser.add_argument("--rates", default="0,0.25,0.5")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seconds", type=float, default=2.0)
  parser.add_argument("--labels", type=int, default=20)
  args = parser.parse_args()

  print("| size | rate | client params | % full | step GFLOP | % full |"
        " peak MiB | % full |")
  print("|---|---|---|---|---|---|---|---|")
  for size in args.sizes.split(","):
    config = config_lib.model_config(size, conv_norm="group_norm")
    model = models.build_model(config)
    batch = random_batch(config.vocab_size, args.batch, args.seconds,
                         args.labels)
    params, model_state = models.split_variables(
        models.init_variables(model, 0))
    loss_fn = models.make_mean_loss_fn(model)
    for rate in (float(r) for r in args.rates.split(",")):
      spec = dropout.make_dropout_spec(
          params, model_state, default_rate=rate,
          droppable=models.droppable_modules_from_config(config))
      submodel_loss_fn = models.make_mean_loss_fn(
          models.build_model(config, kept_units=spec.kept_units))
      cost = dropout.client_cost(loss_fn, optax.adam(1e-3), spec, params,
                                 model_state, batch, jax.random.key(1),
                                 submodel_loss_fn=submodel_loss_fn)
      print(f"| {size} | {rate:g} | {cost['params']:,.0f} |"
            f" {100 * cost['params_fraction']:.1f} |"
            f" {cost['flops'] / 1e9:.3f} |"
            f" {100 * cost['flops_fraction']:.1f} |"
            f" {cost['peak_bytes'] / 2**20:.1f} |"
            f" {100 * cost['peak_bytes_fraction']:.1f} |",
            flush=True)


if __name__ == "__main__":
  main()
