"""The server and client optimizers, now in `conformer_fl/optimizers.py`.

This module re-exports them for code that imports them from here.
"""

# pylint: disable=unused-import
from conformer_fl.optimizers import CLIENT_DEFAULTS
from conformer_fl.optimizers import CLIENT_OPTIMIZERS
from conformer_fl.optimizers import client_optimizer_from_config
from conformer_fl.optimizers import make_client_optimizer
from conformer_fl.optimizers import make_server_optimizer
from conformer_fl.optimizers import SERVER_DEFAULTS
from conformer_fl.optimizers import SERVER_OPTIMIZERS
from conformer_fl.optimizers import server_optimizer_from_config
from conformer_fl.optimizers import server_optimizer_hyperparameters
