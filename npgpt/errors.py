"""npgpt's own error types.

Everything a user can cause (a bad file, a bad flag, bad text) raises an `NpgptError`, so the
command-line tools can print one line and exit instead of showing a traceback.
"""


class NpgptError(Exception):
    """Base class of every error npgpt raises on purpose."""


class FormatError(NpgptError):
    """A file (HDF5, TF checkpoint, safetensors, dataset) is malformed or does not match its config."""


class DataError(NpgptError):
    """The dataset or the text given to classify is not usable."""


class TrainingError(NpgptError):
    """Training cannot go on (non-finite loss or gradient, unwritable output, ...)."""
