"""Retries with exponential backoff for storage operations, and the error raised once the tries are used up.

:func:`retry_with_backoff` runs an operation up to ``attempts`` times, waiting ``backoff_s`` before the second
try and doubling the wait after each failed try (at most :data:`MAX_BACKOFF_S`); every failed try is printed.
After the last try, :class:`StorageUnavailableError` names what could not be done (e.g. the checkpoint URI and
file). :func:`find_storage_error` digs that error out of the exceptions Ray Train wraps it in.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
MAX_BACKOFF_S = 30.0


class StorageUnavailableError(OSError):
    """A storage operation still failed after all its tries (endpoint unreachable or failing); names the URI."""


# Refusals that time does not change: retrying them only delays the error (S3 and pyarrow spellings).
DENIED_MARKERS = ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId",
                  "SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch")


def is_denied(err: BaseException) -> bool:
    """A permission or credential refusal (local ``PermissionError``, S3 403 codes): not worth another try."""
    return isinstance(err, PermissionError) or any(marker in str(err) for marker in DENIED_MARKERS)


def _describe(err: BaseException) -> str:
    # Ray Train re-runs an upload whose error text contains "AWS Error <CODE>" (3 times, unlogged) on top of
    # our own tries: the final error is reworded so that the retry budget is the one the spec asks for.
    text = re.sub(r"AWS Error ", "AWS error ", str(err)).strip()
    return f"{type(err).__name__}: {text[:500]}"


def retry_with_backoff(
    fn: Callable[[], T],
    what: str,
    *,
    attempts: int,
    backoff_s: float,
    retry_on: tuple[type[BaseException], ...] = (OSError,),
    error: type[StorageUnavailableError] = StorageUnavailableError,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, tried up to ``attempts`` times while it raises one of ``retry_on``.

    Waits ``backoff_s`` before the second try and doubles the wait after each failed try (at most
    ``MAX_BACKOFF_S``); every failed try is printed. ``FileNotFoundError`` and an error that was already retried
    (:class:`StorageUnavailableError`) pass through at once; a permission or credential refusal (:func:`is_denied`)
    raises ``error`` at once. After the last try, raises ``error`` naming ``what``
    (e.g. the checkpoint URI and file), the number of tries, the time spent and the last error.
    """
    if attempts < 1:
        raise ValueError(f"attempts: expected an integer >= 1, got {attempts!r}")
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except retry_on as err:
            if isinstance(err, (StorageUnavailableError, FileNotFoundError)):
                raise  # already retried / an answer, not an outage: callers may test for FileNotFoundError
            if is_denied(err):
                raise error(f"{what}: refused, not retried (a permission or credential error); {_describe(err)}") from err
            if attempt == attempts:
                raise error(
                    f"{what}: failed after {attempt} attempt{'s' if attempt > 1 else ''} over "
                    f"{time.monotonic() - start:.1f} s; last error: {_describe(err)}"
                ) from err
            delay = min(MAX_BACKOFF_S, backoff_s * 2 ** (attempt - 1))
            print(f"[ssl_platform] {what}: attempt {attempt}/{attempts} failed ({_describe(err)}); retrying in {delay:.1f} s", flush=True)
            sleep(delay)
    raise AssertionError("unreachable")  # the last attempt returns or raises


def find_storage_error(err: BaseException) -> StorageUnavailableError | None:
    """The :class:`StorageUnavailableError` behind a failed run, if any: Ray Train wraps it in a ``ControllerError``
    (the controller could not write its checkpoint bookkeeping) or a ``WorkerGroupError`` (a checkpoint upload)."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StorageUnavailableError):
            return e
        failures = getattr(e, "worker_failures", None)
        todo += [e.__cause__, e.__context__, getattr(e, "controller_failure", None), getattr(e, "_base_exc", None),
                 getattr(e, "cause", None), *(failures.values() if isinstance(failures, dict) else ())]
    return None
