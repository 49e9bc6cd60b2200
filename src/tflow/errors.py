"""User-facing errors: each names the problem and the fix; CLIs print them without a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class TFlowError(Exception):
    """Base of the errors a user can fix (bad config, missing asset/data/checkpoint)."""


class ConfigError(TFlowError, ValueError):
    """A configuration problem found before any compute."""


class AssetError(TFlowError, RuntimeError):
    """An offline model asset is missing or corrupt."""


class DataError(TFlowError, FileNotFoundError):
    """A data source is missing."""


class CheckpointError(TFlowError, RuntimeError):
    """A checkpoint or trained folder is missing, unreadable, or does not fit the requested run."""


class InputError(TFlowError, ValueError):
    """A bad input (a question, a question file), found before any model loads."""


class BusyError(TFlowError, RuntimeError):
    """Another live process holds a resource this run needs (an output folder)."""


def cli(main: F) -> F:
    """Turn TFlowErrors raised by a CLI entry point into `error: ...` and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except TFlowError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapped  # type: ignore[return-value]
