"""Conformer ASR: front end, encoder, decoders, losses, decoding, units, init."""

from conformer_fl.models.asr import ConformerASR
from conformer_fl.models.asr import greedy_decode
from conformer_fl.models.asr import per_example_loss
from conformer_fl.models.conformer import ConformerConfig
from conformer_fl.models.decoding import ctc_loss
from conformer_fl.models.frontend import log_mel
from conformer_fl.models.frontend import spec_augment
from conformer_fl.models.losses import make_mean_loss_fn
from conformer_fl.models.rnnt import rnnt_loss
from conformer_fl.models.sizes import build_model
from conformer_fl.models.sizes import get_model_config
from conformer_fl.models.sizes import SIZE_FIELDS
from conformer_fl.models.units import droppable_modules
from conformer_fl.models.units import droppable_modules_from_config
from conformer_fl.models.units import list_units
from conformer_fl.models.variables import init_variables
from conformer_fl.models.variables import split_variables

__all__ = [
    "ConformerASR",
    "ConformerConfig",
    "SIZE_FIELDS",
    "build_model",
    "ctc_loss",
    "droppable_modules",
    "droppable_modules_from_config",
    "get_model_config",
    "greedy_decode",
    "init_variables",
    "list_units",
    "log_mel",
    "make_mean_loss_fn",
    "per_example_loss",
    "rnnt_loss",
    "spec_augment",
    "split_variables",
]
