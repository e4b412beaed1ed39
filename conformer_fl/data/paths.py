"""Where the corpora live by default, for the configs and the corpus command.

DEFAULT_DATA_DIR: the TFDS data directory the configs read (and build the
local corpus into) and `python -m conformer_fl.data.synthetic_speech` builds
into: $TFDS_DATA_DIR when set, else ~/.cache/conformer_fl/tfds.
"""

import os

DEFAULT_DATA_DIR = os.environ.get(
    "TFDS_DATA_DIR",
    os.path.join(os.path.expanduser("~"), ".cache", "conformer_fl", "tfds"))
