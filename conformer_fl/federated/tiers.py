"""Clients of mixed capacity in one round: capacity tiers.

A tier is a number of the round's clients that all train the sub-model of
one SubmodelSpec (one static width per dropped layer), with that
sub-model's loss. conformer_fl/federated/fl_round.py vmaps each tier at its own
width inside the one compiled round and adds the tiers' client sums before
the server's mean, which averages each element over the clients (of any
tier) that trained it (submodel.make_average on `union_spec`).

Layout: every tier is spread evenly over the mesh. With D devices on the
mesh's clients axis and C clients per round, each device holds C/D client
slots, tier t the slots [o_t, o_t + C_t/D) of every device (o_t = the local
counts of the tiers before it): global client c = d C/D + j, at local slot
j of device d, is in tier t when o_t <= j < o_t + C_t/D. Clients are
sampled at random into the slots, so a client's tier is drawn per round with
probability C_t / C. Client c's rng is the same as in a round without tiers.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

from conformer_fl.federated import submodel as submodel_lib


@dataclasses.dataclass(frozen=True)
class Tier:
  """One capacity level of a round.

  Attributes:
    clients: C_t, the round's clients in this tier (a multiple of the
      devices of the mesh's clients axis).
    spec: its sub-model (None or an identity spec = the full model).
    loss_fn: the sub-model's loss, at the widths `spec.kept_units` (None =
      the round's loss_fn).
  """
  clients: int
  spec: submodel_lib.SubmodelSpec | None = None
  loss_fn: Callable[..., Any] | None = None


def union_spec(specs: Sequence[submodel_lib.SubmodelSpec | None]
               ) -> submodel_lib.SubmodelSpec | None:
  """The spec the server averages with: every layer some tier drops.

  A layer's entry is the first dropping tier's (the mean reads only its name,
  units and leaves). None when no tier drops or freezes anything.

  Raises:
    ValueError: tiers that freeze different subtrees, or that disagree on a
      layer's units or leaves.
  """
  specs = [spec for spec in specs if spec is not None]
  frozen = {spec.frozen_paths for spec in specs if not spec.is_identity}
  if len(frozen) > 1:
    raise ValueError(f"Capacity tiers freeze different subtrees: "
                     f"{sorted(frozen)}; every tier must freeze the same.")
  layers = {}
  for spec in specs:
    for layer in spec.layers:
      first = layers.setdefault(layer.name, layer)
      if (first.num_units, first.param_leaves, first.state_leaves) != (
          layer.num_units, layer.param_leaves, layer.state_leaves):
        raise ValueError(f"Capacity tiers disagree on the units of layer "
                         f"{layer.name!r}.")
  union = submodel_lib.SubmodelSpec(
      layers=tuple(layers.values()),
      frozen_paths=next(iter(frozen)) if frozen else ())
  return None if union.is_identity else union


def with_union_units(client_fn: Callable[..., Any],
                     union: submodel_lib.SubmodelSpec) -> Callable[..., Any]:
  """client_fn whose output's units cover every layer of `union`.

  A layer the tier keeps whole gets the indicator ones [num_units]: every one
  of its units was trained.
  """

  def tier_client_fn(*args):
    output = client_fn(*args)
    units = dict(output.units or {})
    units = {layer.name: units.get(layer.name,
                                   jnp.ones((layer.num_units,), jnp.float32))
             for layer in union.layers}
    return output._replace(units=units)

  return tier_client_fn


def local_counts(tiers: Sequence[Tier], num_devices: int) -> tuple[int, ...]:
  """Each tier's client slots per device, C_t / D.

  Raises:
    ValueError: a tier whose clients do not divide over the devices.
  """
  for index, tier in enumerate(tiers):
    if tier.clients <= 0 or tier.clients % num_devices:
      raise ValueError(
          f"Capacity tier {index} has {tier.clients} clients, not a positive "
          f"multiple of the {num_devices} devices of the mesh; change the "
          "tier fractions or federated.clients_per_round.")
  return tuple(tier.clients // num_devices for tier in tiers)
