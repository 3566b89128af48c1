"""Exceptions with messages a person can act on.

Protocol modules translate these into their own wire answers (HTTP status, TFTP ERROR code).
"""


class BootserverError(Exception):
    """Base class for every error bootserver raises on purpose."""


class ConfigError(BootserverError):
    """The configuration is invalid; the message names the key and the problem."""


class BadRequest(BootserverError):
    """A client sent something malformed (a bad MAC, a bad option)."""


class Unauthorized(BootserverError):
    """A request that needs a credential came without one."""


class NotFound(BootserverError):
    """The thing asked for does not exist."""


class Forbidden(BootserverError):
    """The thing asked for exists or might, but may not be served (a traversal, a write)."""


class StoreUnavailable(BootserverError):
    """The store cannot be written (disk full, read-only, gone): the request was not recorded, so it
    is refused; the server stays up and works again once the cause is fixed."""


class TooManyRequests(BootserverError):
    """A source asked more than it may (new machines a minute, live streams); it may try again later."""
