"""Every optimizer of a run, each picked by name with its own defaults (optax).

Central training (`make_central_optimizer`, `config.central`): Adam (b1, b2,
eps) on the warm-up / inverse-square-root `learning_rate_schedule`, after
global-norm gradient clipping, with the `frozen_units` never updated.

Federated training: the server optimizers follow Reddi et al., "Adaptive
Federated Optimization" (arXiv 2003.00295): the server treats the NEGATED
example-weighted mean client delta as a pseudo-gradient,
`g = -mean_c(delta_c)`, and applies an optax optimizer to it:

  fedavg   sgd(learning_rate)                 lr 1.0 => params + mean delta
  fedavgm  sgd(learning_rate, momentum)       lr 1.0, momentum 0.9
  fedadam  adam(learning_rate, b1, b2, eps)   lr 1e-2, b1 0.9, b2 0.99, eps 1e-3
  fedyogi  yogi(learning_rate, b1, b2, eps)   as fedadam

(the defaults are `SERVER_DEFAULTS`; eps ~1e-3 as in Reddi et al.). A field
that is unset (None, as `config_lib.federated_config` leaves them) takes the
default of the optimizer's name, so `--config.federated.server_optimizer.name=
fedadam` alone switches to FedAdam with its own learning rate; a field that is
set wins.

Client optimizers run the local steps of one client: 'sgd' or 'adam'
(`CLIENT_DEFAULTS`). The round calls `client_optimizer.init` inside every
client update, so the client optimizer state (e.g. Adam moments) starts fresh
every round.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from conformer_fl import tree_paths
from conformer_fl import unit_patterns
from conformer_fl.models import units as units_lib

PyTree = Any

SERVER_DEFAULTS: dict[str, dict[str, float]] = {
    "fedavg": dict(learning_rate=1.0),
    "fedavgm": dict(learning_rate=1.0, momentum=0.9),
    "fedadam": dict(learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-3),
    "fedyogi": dict(learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-3),
}
SERVER_OPTIMIZERS = tuple(SERVER_DEFAULTS)
CLIENT_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": dict(),
    "adam": dict(b1=0.9, b2=0.999, eps=1e-8),
}
CLIENT_OPTIMIZERS = tuple(CLIENT_DEFAULTS)


# ----------------------------------------------------------------------------
# Central training.


def learning_rate_schedule(peak: float, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up to `peak` over `warmup_steps`, then peak * sqrt(warmup/step).

  Raises:
    ValueError: warmup_steps < 1.
  """
  if warmup_steps < 1:
    raise ValueError(f"central.warmup_steps must be >= 1, got {warmup_steps}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32) + 1.0
    return peak * jnp.minimum(step / warmup_steps,
                              jnp.sqrt(warmup_steps / step))

  return schedule


def freeze_units(optimizer: optax.GradientTransformation, params: PyTree,
                 frozen: tuple[str, ...],
                 granularity: str = "module") -> optax.GradientTransformation:
  """`optimizer` on every unit but the `frozen` ones, which never change.

  Args:
    optimizer: the optimizer of the trained units.
    params: the model's params (arrays or jax.ShapeDtypeStruct; only the
      structure is read).
    frozen: patterns over the `models.list_units` names at `granularity`
      (conformer_fl/unit_patterns.py: an exact name, a block
      'encoder/block_00' or a glob such as 'encoder/block_0[01]/*').
    granularity: 'block' or 'module'.

  Raises:
    ValueError: a pattern that matches no unit of the model (the message
      names `central.frozen_units`, the pattern and the units).
  """
  if not frozen:
    return optimizer
  units = units_lib.list_units(params, granularity=granularity)
  selected = unit_patterns.select_units(frozen, list(units),
                                        field="central.frozen_units")
  labels = jax.tree.map(lambda _: "train", params)
  for name in selected:
    labels = tree_paths.replace(labels, units[name], jax.tree.map(
        lambda _: "frozen", tree_paths.get(labels, units[name])))
  return optax.multi_transform(
      {"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def make_central_optimizer(c: ml_collections.ConfigDict,
                           params: PyTree) -> optax.GradientTransformation:
  """Adam (b1, b2, eps), warm-up / rsqrt schedule, norm clipping, frozen units.

  Args:
    c: `config.central` (`config_lib.central_run_config` documents its fields).
    params: the model's params (only the structure is read).
  """
  schedule = learning_rate_schedule(c.peak_learning_rate, c.warmup_steps)
  optimizer = optax.adam(schedule, b1=c.b1, b2=c.b2, eps=c.eps)
  if c.clip_grad_norm:
    optimizer = optax.chain(optax.clip_by_global_norm(c.clip_grad_norm),
                            optimizer)
  return freeze_units(optimizer, params, tuple(c.frozen_units))


# ----------------------------------------------------------------------------
# Federated training.


def _with_defaults(name: str, defaults: Mapping[str, Mapping[str, float]],
                   what: str, fields: Mapping[str, Any]) -> dict[str, Any]:
  """`fields` with each None (unset) field taken from `defaults[name]`.

  Raises:
    ValueError: an unknown name.
  """
  if name not in defaults:
    raise ValueError(f"Unknown {what} optimizer {name!r}; expected one of"
                     f" {tuple(defaults)}.")
  resolved = dict(defaults[name])
  resolved.update({k: v for k, v in fields.items() if v is not None})
  return resolved


def make_server_optimizer(
    name: str,
    *,
    learning_rate: float | None = None,
    momentum: float | None = None,
    b1: float | None = None,
    b2: float | None = None,
    eps: float | None = None,
) -> optax.GradientTransformation:
  """Returns the server optimizer `name`, applied to the pseudo-gradient.

  Each argument left None takes `SERVER_DEFAULTS[name]`; an argument the
  optimizer does not use (e.g. momentum of 'fedadam') is ignored.

  Args:
    name: one of SERVER_OPTIMIZERS.
    learning_rate: server learning rate (1.0 = plain FedAvg for 'fedavg').
    momentum: 'fedavgm' momentum.
    b1: first-moment decay of 'fedadam' / 'fedyogi'.
    b2: second-moment decay of 'fedadam' / 'fedyogi'.
    eps: adaptivity of 'fedadam' / 'fedyogi' (1e-3 in Reddi et al.).

  Raises:
    ValueError: for an unknown name.
  """
  h = _with_defaults(name, SERVER_DEFAULTS, "server", dict(
      learning_rate=learning_rate, momentum=momentum, b1=b1, b2=b2, eps=eps))
  if name == "fedavg":
    return optax.sgd(h["learning_rate"])
  if name == "fedavgm":
    return optax.sgd(h["learning_rate"], momentum=h["momentum"])
  if name == "fedadam":
    return optax.adam(h["learning_rate"], b1=h["b1"], b2=h["b2"],
                      eps=h["eps"])
  return optax.yogi(h["learning_rate"], b1=h["b1"], b2=h["b2"], eps=h["eps"])


def make_client_optimizer(
    name: str,
    *,
    learning_rate: float,
    clip_grad_norm: float | None = None,
    b1: float | None = None,
    b2: float | None = None,
    eps: float | None = None,
) -> optax.GradientTransformation:
  """Returns the client optimizer `name`, optionally with gradient clipping.

  Each of b1, b2, eps left None takes `CLIENT_DEFAULTS[name]` (unused by sgd).

  Args:
    name: one of CLIENT_OPTIMIZERS ('sgd' or 'adam').
    learning_rate: client learning rate.
    clip_grad_norm: gradients are clipped to this global L2 norm before the
      optimizer; 0 or None = no clipping (the chain is the optimizer alone).
    b1: Adam first-moment decay (0.9).
    b2: Adam second-moment decay (0.999).
    eps: Adam epsilon (1e-8).

  Raises:
    ValueError: for an unknown name or a negative clip_grad_norm.
  """
  h = _with_defaults(name, CLIENT_DEFAULTS, "client",
                     dict(b1=b1, b2=b2, eps=eps))
  if name == "sgd":
    optimizer = optax.sgd(learning_rate)
  else:
    optimizer = optax.adam(learning_rate, b1=h["b1"], b2=h["b2"],
                           eps=h["eps"])
  if clip_grad_norm is None or clip_grad_norm == 0:
    return optimizer
  if clip_grad_norm < 0:
    raise ValueError(f"clip_grad_norm={clip_grad_norm} must be >= 0 (0 = no"
                     " clipping).")
  return optax.chain(optax.clip_by_global_norm(clip_grad_norm), optimizer)


def _as_kwargs(config: Any, what: str) -> dict[str, Any]:
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ValueError(f"{what} config must be a mapping or ConfigDict, got"
                     f" {type(config).__name__}.")
  kwargs = dict(config)
  if "name" not in kwargs:
    raise ValueError(f'{what} config needs a "name" field; got {kwargs}.')
  return kwargs


def server_optimizer_hyperparameters(config: Any) -> dict[str, Any]:
  """The name and hyperparameters the server optimizer of `config` runs with.

  Args:
    config: ConfigDict or mapping with `name` and any of learning_rate,
      momentum, b1, b2, eps; unset (None or absent) fields take
      `SERVER_DEFAULTS[name]`.

  Returns:
    {'name': ..., and the fields the optimizer reads}.

  Raises:
    ValueError: an unknown name or field.
  """
  kwargs = _as_kwargs(config, "Server optimizer")
  name = kwargs.pop("name")
  unknown = sorted(set(kwargs) - {"learning_rate", "momentum", "b1", "b2",
                                  "eps"})
  if unknown:
    raise ValueError(f"Bad server optimizer config field: {unknown}")
  resolved = _with_defaults(name, SERVER_DEFAULTS, "server", kwargs)
  return {"name": name, **{k: resolved[k] for k in SERVER_DEFAULTS[name]}}


def server_optimizer_from_config(config: Any) -> optax.GradientTransformation:
  """`make_server_optimizer` of `server_optimizer_hyperparameters(config)`.

  Args:
    config: ConfigDict or mapping with `name` and any of learning_rate,
      momentum, b1, b2, eps (`config.federated.server_optimizer`); unset
      (None or absent) fields take `SERVER_DEFAULTS[name]`.

  Raises:
    ValueError: an unknown name or field.
  """
  hyperparameters = server_optimizer_hyperparameters(config)
  return make_server_optimizer(hyperparameters.pop("name"), **hyperparameters)


def client_optimizer_from_config(config: Any) -> optax.GradientTransformation:
  """`make_client_optimizer(**config)`.

  Args:
    config: ConfigDict or mapping with `name`, `learning_rate` and any of
      clip_grad_norm, b1, b2, eps (`config.federated.client_optimizer`).

  Raises:
    ValueError: an unknown name or field.
  """
  kwargs = _as_kwargs(config, "Client optimizer")
  try:
    return make_client_optimizer(kwargs.pop("name"), **kwargs)
  except TypeError as e:
    raise ValueError(f"Bad client optimizer config field: {e}") from e
