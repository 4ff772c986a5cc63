"""The one exception tree of crossgrad.

    CrossgradError                 anything crossgrad raises on purpose
    ├── ConfigError                bad names, values or combinations (CLI exit code 2)
    │   └── UnknownNameError       a name not in a registry; lists the known names
    ├── DataError                  data files missing or malformed (CLI exit code 2)
    ├── SolverError                the QP solver failed (caught and counted by CGA)
    └── ProtocolError              a request, a message or a call went wrong (gRPC status below)
        ├── InvalidMessage         INVALID_ARGUMENT     malformed request or tensor stream
        ├── TruncatedStream        DATA_LOSS            a stream ended before its declared size
        ├── TooLarge               RESOURCE_EXHAUSTED   above the configured size limits
        ├── StaleRound             FAILED_PRECONDITION  a round no longer kept
        ├── NotReady               FAILED_PRECONDITION  asked before the run is assembled
        ├── PermissionDenied       PERMISSION_DENIED    the caller may not do that
        │   └── NotANeighbor                                the requester is not a neighbor
        ├── Unauthenticated        UNAUTHENTICATED      missing or wrong credentials
        ├── NotFound               NOT_FOUND            an id that never joined
        ├── AlreadyExists          ALREADY_EXISTS       an id held by another live peer
        ├── Unavailable            UNAVAILABLE          starting, draining, or unreachable
        └── DeadlineExceeded       DEADLINE_EXCEEDED    did not happen before the deadline

Every message says what was expected, what came, and what to do. The CLI turns a
ConfigError or DataError into one line on stderr and exit code 2; crossgrad/rpc.py maps the
ProtocolError classes to gRPC status codes and back, in one table.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CrossgradError(Exception):
    """Base of every error crossgrad raises on purpose."""


class ConfigError(CrossgradError):
    """A configuration value, name or combination is invalid."""


class UnknownNameError(ConfigError):
    """A name that is not in a registry."""

    def __init__(self, kind: str, name: str, known: Iterable[str], where: str = "") -> None:
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
        # A typo is the usual cause: name the closest known name when one is close enough.
        close = difflib.get_close_matches(str(name), self.known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}unknown {kind} {name!r}{hint}; known {plural}: "
                         f"{', '.join(self.known)}")


class DataError(CrossgradError):
    """Data files are missing, unreadable or malformed."""


class SolverError(CrossgradError):
    """The QP solver did not return a usable solution."""


class ProtocolError(CrossgradError):
    """A request, a message or a call went wrong; crossgrad/rpc.py maps each kind to a status."""


class InvalidMessage(ProtocolError):
    """A malformed request or tensor stream (shape, dtype, size, NaN, checksum, ...)."""


class TruncatedStream(ProtocolError):
    """A stream ended before all the bytes its header declared arrived."""


class TooLarge(ProtocolError):
    """A message or stream above the configured limits."""


class StaleRound(ProtocolError):
    """A round this node no longer keeps (it keeps the last few)."""


class NotReady(ProtocolError):
    """Asked for something that does not exist yet (e.g. before the run is assembled)."""


class PermissionDenied(ProtocolError):
    """The caller is known but may not do that: it acts under another node's id than its
    certificate names, or it is not a node of the run at all."""


class NotANeighbor(PermissionDenied):
    """The requester is not a neighbor of this node in the current assignment."""


class Unauthenticated(ProtocolError):
    """Missing or wrong credentials."""


class NotFound(ProtocolError):
    """An id that never joined."""


class AlreadyExists(ProtocolError):
    """An id held by another live peer."""


class Unavailable(ProtocolError):
    """Starting, draining, or unreachable."""


class DeadlineExceeded(ProtocolError):
    """It did not happen before the deadline (e.g. a future round that never arrived)."""
