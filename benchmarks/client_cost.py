r"""What one client step of Federated Dropout costs, against the full model.

For each model size and uniform dropout rate (every feed-forward, conv-module and
attention layer), prints the parameters a client optimizes, the FLOPs of one local
step (XLA's cost analysis of the compiled step) and its peak memory (XLA's memory
analysis), each also as a percentage of the full model (rate 0). Nothing is timed,
so the figures do not drift with the load of the machine.

  .venv/bin/python benchmarks/client_cost.py --sizes=tiny,demo --rates=0,0.25,0.5
Flags are absl flags (`--help` lists them); a bad one ends the run with one
line `error: ...`, exit status 1.
"""

from absl import flags
import jax
import numpy as np
import optax

from conformer_fl import cli
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


def define_flags(flag_values: flags.FlagValues) -> None:
  """The benchmark's flags (absl)."""
  f = flag_values
  flags.DEFINE_list("sizes", "tiny,demo", "Comma-separated model sizes.",
                    flag_values=f)
  flags.DEFINE_list("rates", "0,0.25,0.5",
                    "Comma-separated uniform dropout rates.", flag_values=f)
  flags.DEFINE_integer("batch", 4, "Utterances per client step.",
                       flag_values=f)
  flags.DEFINE_float("seconds", 2.0, "Utterance length in seconds.",
                     flag_values=f)
  flags.DEFINE_integer("labels", 20, "Labels per utterance.", flag_values=f)


def main(command_line: cli.ScriptArgs) -> None:
  args = command_line.flags
  print("| size | rate | client params | % full | step GFLOP | % full |"
        " peak MiB | % full |")
  print("|---|---|---|---|---|---|---|---|")
  for size in args.sizes:
    config = config_lib.model_config(size, conv_norm="group_norm")
    model = models.build_model(config)
    batch = random_batch(config.vocab_size, args.batch, args.seconds,
                         args.labels)
    params, model_state = models.split_variables(
        models.init_variables(model, 0))
    loss_fn = models.make_mean_loss_fn(model)
    for rate in (float(r) for r in args.rates):
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
  cli.run_script(main, define_flags)
