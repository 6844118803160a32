"""The CLI's ONE error handler, and its one way of telling the user something.

Every expected failure (bad config, unknown name, missing data, checksum mismatch, unusable
store, a refused or crashed submission, a bad entry) ends with ONE line,
``robustmatrix: error: ...``, naming the problem and the fix, and exit status 2. Nothing already
stored is touched by a failing command.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable


def info(msg: str) -> None:
    """A progress or result line on stderr (stdout carries the tables)."""
    print(f"robustmatrix: {msg}", file=sys.stderr, flush=True)


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that end a command with one line (imported only when one is raised)."""
    from bench.artifacts import ArtifactError
    from bench.core.config import ConfigError
    from bench.core.registry import RegistryError
    from bench.core.store import StoreError
    from bench.data import DataError
    from bench.harness.scoring import AttackContractError
    from bench.harness.submission.load import SubmitError
    from bench.harness.submission.sandbox import SandboxError
    from bench.harness.validate import ValidationError
    from bench.models import CheckpointError, ChecksumError
    from defenses.base import DefenseNotFittedError
    from leaderboard.compare import CompareError
    from leaderboard.entries import EntryError

    return (ConfigError, RegistryError, StoreError, ArtifactError, AttackContractError,
            DataError, ChecksumError, CheckpointError,  # a checkpoint that is not one (HTML, junk)
            DefenseNotFittedError,
            SandboxError,  # submitted code that crashed, hung or ran out of memory
            SubmitError, ValidationError, EntryError, CompareError)


def run_command(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one command's handler; an expected error becomes one line and exit status 2."""
    from bench.core.config import one_line

    try:
        return handler(args)
    except expected_errors() as exc:
        print(f"robustmatrix: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a read-only run directory while writing files
        if _database_error(exc) is not None:  # pandas' DatabaseError is an OSError
            return _damaged_store(exc)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        print(f"robustmatrix: error: {one_line(exc)}; is the disk full or the run directory "
              "read-only? Finished batches are stored: fix it and run the same command again "
              "to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustmatrix: interrupted; finished batches are stored, run the same command "
              "again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a damaged store is named; anything else re-raised
        if _database_error(exc) is None:
            raise
        return _damaged_store(exc)


def _damaged_store(exc: BaseException) -> int:
    from bench.core.config import one_line

    print(f"robustmatrix: error: the result store is damaged ({one_line(_database_error(exc))}); "
          "restore results.sqlite from a copy, or recover what is readable with `sqlite3 "
          "results.sqlite .recover | sqlite3 recovered.sqlite`, or use a new --run-dir",
          file=sys.stderr)
    return 2


def _database_error(exc: BaseException) -> BaseException | None:
    """The ``sqlite3.DatabaseError`` behind ``exc`` (itself, or its cause / context, e.g. the
    one pandas wraps in ``pandas.errors.DatabaseError``), when the file is damaged."""
    import sqlite3

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
                exc, (sqlite3.OperationalError, sqlite3.IntegrityError,
                      sqlite3.ProgrammingError)):
            return exc
        if isinstance(exc, sqlite3.OperationalError) and "malformed" in str(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
