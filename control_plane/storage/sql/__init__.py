"""Read-only SQL over the worker history, for admins (the CLI and the admin API):
:func:`run_readonly` runs one bounded query (:mod:`.readonly`), :class:`SqlExecutor` runs
the admin API's on threads of their own (:mod:`.executor`), and :mod:`.results` holds what
comes back."""

from control_plane.storage.sql.executor import SqlExecutor
from control_plane.storage.sql.readonly import (
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_TIMEOUT_S,
    UNSAFE_FUNCTIONS,
    run_readonly,
)
from control_plane.storage.sql.results import (
    QueryHandle,
    QueryResult,
    ReadOnlyViolation,
    SqlBusy,
    SqlInterrupted,
    SqlTimeout,
    format_table,
    json_value,
)

__all__ = [
    "DEFAULT_MAX_RESULT_BYTES",
    "DEFAULT_TIMEOUT_S",
    "UNSAFE_FUNCTIONS",
    "QueryHandle",
    "QueryResult",
    "ReadOnlyViolation",
    "SqlBusy",
    "SqlExecutor",
    "SqlInterrupted",
    "SqlTimeout",
    "format_table",
    "json_value",
    "run_readonly",
]
