"""One exception type for every user-facing problem.

The CLI prints ``str(error)`` as a single line and exits non-zero; nothing
else about a ``TcskdError`` is shown unless ``--debug`` is given.
"""


class TcskdError(Exception):
    """A problem caused by the user's input or environment, reported in one line."""

    exit_code = 2


class StoreError(TcskdError):
    """The feature store is missing, incomplete, corrupt or does not match."""


class NoTokensError(TcskdError):
    """A token grid was asked of a teacher that gives only a global feature (``tcskd cache --tokens patch``)."""


class LockedError(TcskdError):
    """Another process is writing the same cache."""

    exit_code = 3


class DataError(TcskdError):
    """A dataset spec, folder, image or mask is wrong (``tcskd.data`` raises it; defined here so that
    ``tcskd.segdata`` can raise it too without importing ``tcskd.data``)."""


class MissingSplitError(DataError):
    """A dataset has no such split (e.g. no test folder): :func:`tcskd.data.has_split` answers False for it,
    while any other DataError of that split (unreadable, a split named explicitly and absent) is raised."""
