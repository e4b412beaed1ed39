"""Fits a run config to the number of devices of the runtime it runs on.

The notebooks of colabs/ run the configs of configs/ on whatever runtime they
get: one CPU device, one GPU, the 8 cores of a TPU. Two fields depend on the
device count:

* a federated round runs `federated.clients_per_round` clients over every
  device, the same number on each (`federated.mesh`), so that number must be a
  multiple of the devices, and at most the clients the corpus has;
* central training splits `data.batch_size` over `central.num_devices`
  devices (0 = all of them), so the batch must divide over them.

`fit_config` changes only a field that does not fit, to the nearest value that
does, and returns one line per change.
"""

import ml_collections

from conformer_fl.data import synthetic_speech


def central_devices(batch_size: int, device_count: int) -> int:
  """The most devices, at most `device_count`, that `batch_size` divides over."""
  if batch_size <= 0 or device_count <= 0:
    raise ValueError(f"batch_size={batch_size} and device_count={device_count}"
                     " must be positive.")
  return max(d for d in range(1, min(batch_size, device_count) + 1)
             if batch_size % d == 0)


def clients_per_round(clients: int, device_count: int,
                      num_clients: int | None) -> int:
  """The smallest multiple of `device_count` that is at least `clients`.

  Args:
    clients: the config's clients per round.
    device_count: the devices a round runs on.
    num_clients: the clients of the corpus (None = no limit).

  Raises:
    ValueError: the corpus has fewer clients than that multiple.
  """
  if clients <= 0 or device_count <= 0:
    raise ValueError(f"clients={clients} and device_count={device_count} must"
                     " be positive.")
  chosen = -(-clients // device_count) * device_count
  if num_clients is not None and chosen > num_clients:
    raise ValueError(
        f"{clients} clients per round need a multiple of the {device_count}"
        f" devices, {chosen}, but the corpus has {num_clients} clients: run on"
        f" a runtime with at most {num_clients} devices, or on a corpus with"
        " more speakers.")
  return chosen


def corpus_clients(data: ml_collections.ConfigDict) -> int | None:
  """The train speakers (clients) of a synthetic corpus; None for others."""
  if data.dataset != "synthetic_speech":
    return None
  by_name = {c.name: c for c in synthetic_speech.CONFIGS}
  corpus = by_name.get(data.builder_config)
  return None if corpus is None else corpus.num_train_speakers


def _fit_central(config: ml_collections.ConfigDict, device_count: int,
                 name: str) -> list[str]:
  """Sets `config.central.num_devices` when the batch does not divide."""
  batch = config.data.batch_size
  devices = min(config.central.num_devices or device_count, device_count)
  if batch % devices == 0 and config.central.num_devices <= device_count:
    return []
  chosen = central_devices(batch, devices)
  config.central.num_devices = chosen
  return [f"{name}central.num_devices={chosen}: data.batch_size={batch}"
          f" divides over {chosen} of the {device_count} devices"]


def _fit_federated(federated: ml_collections.ConfigDict,
                   data: ml_collections.ConfigDict, device_count: int,
                   name: str) -> list[str]:
  """Sets `federated.clients_per_round` to a multiple of the devices."""
  clients = federated.clients_per_round
  chosen = clients_per_round(clients, device_count, corpus_clients(data))
  if chosen == clients:
    return []
  federated.clients_per_round = chosen
  return [f"{name}federated.clients_per_round={chosen} (the config's"
          f" {clients} do not divide over the {device_count} devices)"]


def fit_config(config: ml_collections.ConfigDict,
               device_count: int) -> list[str]:
  """Fits a central, federated or experiment config to `device_count` devices.

  Changes `config` in place: the central runs' `central.num_devices` (an
  experiment's `pretrain` and `stability.runs`) and the federated
  `clients_per_round` (an experiment's `adapt`), where they do not fit.

  Returns:
    One line per changed field, naming it and why (empty when all fit).

  Raises:
    ValueError: a round needs more clients than the corpus has.
  """
  lines = []
  if "central" in config:
    lines += _fit_central(config, device_count, "")
  if "federated" in config:
    lines += _fit_federated(config.federated, config.data, device_count, "")
  if config.get("mode") == "experiment":
    lines += _fit_central(config.pretrain, device_count, "pretrain.")
    for run_name, run in config.stability.runs.items():
      lines += _fit_central(run, device_count, f"stability.runs.{run_name}.")
    lines += _fit_federated(config.adapt.federated, config.adapt.data,
                            device_count, "adapt.")
  return lines
