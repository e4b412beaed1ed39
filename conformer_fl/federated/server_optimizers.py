"""Server and client optimizers of federated training (optax).

Server optimizers follow Reddi et al., "Adaptive Federated Optimization"
(arXiv 2003.00295): the server treats the NEGATED example-weighted mean client
delta as a pseudo-gradient, `g = -mean_c(delta_c)`, and applies an optax
optimizer to it:

  fedavg   sgd(learning_rate)            lr 1.0 => params + mean delta (FedAvg)
  fedavgm  sgd(learning_rate, momentum)  FedAvg with server momentum
  fedadam  adam(learning_rate, b1, b2, eps)   eps ~1e-3 as in Reddi et al.
  fedyogi  yogi(learning_rate, b1, b2, eps)

Client optimizers run the local steps of one client: 'sgd' or 'adam'. The
round calls `client_optimizer.init` inside every client update, so the client
optimizer state (e.g. Adam moments) starts fresh every round.
"""

from collections.abc import Mapping
from typing import Any

import optax

SERVER_OPTIMIZERS = ('fedavg', 'fedavgm', 'fedadam', 'fedyogi')
CLIENT_OPTIMIZERS = ('sgd', 'adam')


def make_server_optimizer(
    name: str,
    *,
    learning_rate: float = 1.0,
    momentum: float = 0.9,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
) -> optax.GradientTransformation:
  """Returns the server optimizer `name`, applied to the pseudo-gradient.

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
  if name == 'fedavg':
    return optax.sgd(learning_rate)
  if name == 'fedavgm':
    return optax.sgd(learning_rate, momentum=momentum)
  if name == 'fedadam':
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == 'fedyogi':
    return optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps)
  raise ValueError(
      f'Unknown server optimizer {name!r}; expected one of'
      f' {SERVER_OPTIMIZERS}.')


def make_client_optimizer(
    name: str,
    *,
    learning_rate: float,
    clip_grad_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
  """Returns the client optimizer `name`, optionally with gradient clipping.

  Args:
    name: 'sgd' or 'adam'.
    learning_rate: client learning rate.
    clip_grad_norm: gradients are clipped to this global L2 norm before the
      optimizer; 0 or None = no clipping (the chain is the optimizer alone).
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam epsilon.

  Raises:
    ValueError: for an unknown name or a negative clip_grad_norm.
  """
  if name == 'sgd':
    optimizer = optax.sgd(learning_rate)
  elif name == 'adam':
    optimizer = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  else:
    raise ValueError(
        f'Unknown client optimizer {name!r}; expected one of'
        f' {CLIENT_OPTIMIZERS}.')
  if clip_grad_norm is None or clip_grad_norm == 0:
    return optimizer
  if clip_grad_norm < 0:
    raise ValueError(f'clip_grad_norm={clip_grad_norm} must be >= 0 (0 = no'
                     ' clipping).')
  return optax.chain(optax.clip_by_global_norm(clip_grad_norm), optimizer)


def _as_kwargs(config: Any, what: str) -> dict[str, Any]:
  if hasattr(config, 'to_dict'):  # ml_collections.ConfigDict
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ValueError(f'{what} config must be a mapping or ConfigDict, got'
                     f' {type(config).__name__}.')
  kwargs = dict(config)
  if 'name' not in kwargs:
    raise ValueError(f'{what} config needs a "name" field; got {kwargs}.')
  return kwargs


def server_optimizer_from_config(config: Any) -> optax.GradientTransformation:
  """`make_server_optimizer(**config)`; config: ConfigDict or mapping with
  `name` and any of learning_rate, momentum, b1, b2, eps."""
  kwargs = _as_kwargs(config, 'Server optimizer')
  try:
    return make_server_optimizer(kwargs.pop('name'), **kwargs)
  except TypeError as e:
    raise ValueError(f'Bad server optimizer config field: {e}') from e


def client_optimizer_from_config(config: Any) -> optax.GradientTransformation:
  """`make_client_optimizer(**config)`; config: ConfigDict or mapping with
  `name`, `learning_rate` and any of clip_grad_norm, b1, b2, eps."""
  kwargs = _as_kwargs(config, 'Client optimizer')
  try:
    return make_client_optimizer(kwargs.pop('name'), **kwargs)
  except TypeError as e:
    raise ValueError(f'Bad client optimizer config field: {e}') from e
