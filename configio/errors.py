"""Errors a user can fix. A job prints each as one line (`error: <message>`) and exits with status 2.

Every message names the problem and the remedy. The types differ only so callers can tell what went wrong.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names it and says how."""


class ConfigError(UserError, ValueError):
    """A setting that is missing, unknown, of the wrong type or out of range."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or exported model that is missing, incomplete or corrupt."""


class DatasetError(UserError, RuntimeError):
    """A data set that cannot be found, read or downloaded."""


class TrainingDiverged(UserError, RuntimeError):
    """Training produced a non-finite loss or non-finite latents: the run diverged, it is not misconfigured."""


class FolderBusy(UserError, RuntimeError):
    """Another job is writing into the same output folder."""


class NonFiniteValues(ValueError):
    """A computation met NaN or inf in its input (a library error; a training loop reports it as divergence)."""


class WriteFailed(OSError):
    """A file that could not be written (no space, a file-size limit, a read-only or vanished folder): the OS's errno
    and reason, with the path the user expects rather than the hidden temporary the writer was filling."""
