"""The one exception tree of crossgrad.

    CrossgradError                 anything crossgrad raises on purpose
    ├── ConfigError                bad names, values or combinations (CLI exit code 2)
    │   └── UnknownNameError       a name not in a registry; lists the known names
    ├── DataError                  data files missing or malformed (CLI exit code 2)
    └── SolverError                the QP solver failed (caught and counted by CGA)

Every message says what was expected, what came, and what to do. The CLI turns a
ConfigError or DataError into one line on stderr and exit code 2; the RPC layer maps the tree
to gRPC status codes in one place.
"""

from __future__ import annotations

from collections.abc import Iterable


class CrossgradError(Exception):
    """Base of every error crossgrad raises on purpose."""


class ConfigError(CrossgradError):
    """A configuration value, name or combination is invalid."""


class UnknownNameError(ConfigError):
    """A name that is not in a registry."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
        super().__init__(f"unknown {kind} {name!r}; known {plural}: {', '.join(self.known)}")


class DataError(CrossgradError):
    """Data files are missing, unreadable or malformed."""


class SolverError(CrossgradError):
    """The QP solver did not return a usable solution."""
