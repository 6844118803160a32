"""The result store: SQLite (WAL) in the run directory.

Schema (``SCHEMA_VERSION`` bumps invalidate cell keys):

* ``cells``: one row per (dataset, defense, attack, threat, eps) cell, keyed by a content hash of
  every input (data fingerprint, defense config and weights sha256, attack config, epsilon,
  seed, batch size, and, under worst-case scheduling, the keys of the cells it depends on).
  Status ``running`` until every batch is in, then ``done``; provenance, flags and metrics are
  JSON columns.
* ``batches``: one row per committed batch of a cell (the unit of resume) with the sha256 of
  its stored adversarial tensors.
* ``samples``: one row per sample per cell: the stored unit of the benchmark.

Every batch is written in ONE transaction together with its batch row, so a kill at any point
leaves either the whole batch or none of it; a resumed run recomputes only missing batches.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from bench.core.hashing import text_sha256
from bench.core.schema import SAMPLE_FIELDS, SampleRow

SCHEMA_VERSION = 1


_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    dataset TEXT NOT NULL, defense TEXT NOT NULL, attack TEXT NOT NULL,
    threat TEXT NOT NULL, eps REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done')),
    n_batches INTEGER NOT NULL,
    spec TEXT NOT NULL, provenance TEXT, flags TEXT, metrics TEXT,
    adv_sha256 TEXT, wall_time REAL, forward_passes INTEGER, backward_passes INTEGER,
    created REAL NOT NULL, finished REAL
);
CREATE TABLE IF NOT EXISTS batches (
    cell_key TEXT NOT NULL REFERENCES cells(key), batch INTEGER NOT NULL,
    adv_path TEXT, adv_sha256 TEXT, wall_time REAL, extras TEXT,
    PRIMARY KEY (cell_key, batch)
);
CREATE TABLE IF NOT EXISTS samples (
    cell_key TEXT NOT NULL REFERENCES cells(key),
    idx INTEGER NOT NULL, sample_id TEXT NOT NULL, label INTEGER NOT NULL,
    attacked INTEGER NOT NULL, clean_correct INTEGER NOT NULL, clean_flagged INTEGER,
    adv_correct INTEGER, adv_flagged INTEGER, robust INTEGER NOT NULL,
    norm REAL, iterations INTEGER, forward_passes INTEGER, backward_passes INTEGER,
    any_iterate_adversarial INTEGER, adv_pred INTEGER,
    PRIMARY KEY (cell_key, sample_id)
);
CREATE INDEX IF NOT EXISTS samples_by_cell ON samples(cell_key);
"""


class StoreError(RuntimeError):
    """A store that cannot be opened or written; the message names the fix."""


@dataclass
class CellRow:
    key: str
    dataset: str
    defense: str
    attack: str
    threat: str
    eps: float
    status: str
    n_batches: int
    spec: dict
    provenance: dict
    flags: list
    metrics: dict
    adv_sha256: str | None
    wall_time: float | None
    forward_passes: int | None
    backward_passes: int | None


class ResultStore:
    """A thin, explicit layer over one SQLite file."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise StoreError(f"no result store at {self.path}; run `robustmatrix run` first "
                                 "or pass --run-dir pointing at an existing run")
            uri = self.path.resolve().as_uri() + "?mode=ro"
            try:
                try:
                    self.conn = sqlite3.connect(uri, uri=True, timeout=30)
                    self.conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                except sqlite3.OperationalError as exc:
                    if "unable to open" not in str(exc) or os.access(self.path.parent, os.W_OK):
                        raise
                    self.conn = self._open_read_only_folder()
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"cannot read the result store {self.path} ({exc}); it is not a "
                                 "robustmatrix store or it is damaged: pass --run-dir pointing at "
                                 "a run directory") from exc
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.conn = self._open_writable()
            except (sqlite3.DatabaseError, OSError) as exc:  # incl. 'file is not a database'
                raise StoreError(f"cannot open the result store {self.path} for writing ({exc}); "
                                 "check the directory is writable, the disk is not full and the "
                                 "file is a robustmatrix store, or choose another --run-dir"
                                 ) from exc
        self.conn.row_factory = sqlite3.Row

    def _open_read_only_folder(self) -> sqlite3.Connection:
        """A store in a folder this process cannot write (a read-only mount, another user's
        run): SQLite cannot create the WAL index there, so it is opened as immutable, which is
        exact when no write is pending in ``results.sqlite-wal`` (a finished run leaves none)."""
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise StoreError(f"the run directory {self.path.parent} is read-only and the store's "
                             f"latest writes are still in {wal.name}; copy the run directory "
                             "somewhere writable (cp -r) and pass --run-dir pointing at the copy")
        conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro&immutable=1", uri=True)
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn

    def _open_writable(self, wait: float = 30.0) -> sqlite3.Connection:
        """Connect, switch to WAL and create the schema. Two runs opening one NEW store at the
        same moment race on the journal-mode switch, for which SQLite returns 'database is
        locked' at once (its busy handler is not consulted there), so the whole opening is
        retried with a short back-off for up to ``wait`` seconds."""
        deadline = time.monotonic() + wait
        delay = 0.02
        while True:
            conn = sqlite3.connect(self.path, timeout=wait, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_DDL)
                self.conn = conn
                self._check_schema()
                return conn
            except sqlite3.OperationalError as exc:
                conn.close()
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            except BaseException:
                conn.close()
                raise

    def _check_schema(self) -> None:
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                              (str(SCHEMA_VERSION),))
        elif str(row[0]) != str(SCHEMA_VERSION):
            raise StoreError(f"the store {self.path} has schema {row[0]}, this robustmatrix "
                             f"writes schema {SCHEMA_VERSION}; use a new --run-dir")

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"the store {self.path} is locked or not writable ({exc}); another "
                             "run may be writing it: wait for it or use another --run-dir") from exc
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as exc:
            if self.conn.in_transaction:  # SQLite may have rolled back itself (SQLITE_FULL)
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
                # a full disk, a read-only file or directory, an I/O error: one line, not a trace
                raise StoreError(f"could not write to the result store {self.path} ({exc}); is "
                                 "the disk full or the run directory read-only? Nothing already "
                                 "stored was lost: fix it and run the same command again to "
                                 "resume") from exc
            raise

    # cells ------------------------------------------------------------------------------------
    def cell(self, key: str) -> CellRow | None:
        r = self.conn.execute("SELECT * FROM cells WHERE key=?", (key,)).fetchone()
        return _cell_row(r) if r else None

    def cells(self, status: str | None = "done") -> list[CellRow]:
        q = "SELECT * FROM cells" + (" WHERE status=?" if status else "") + " ORDER BY created"
        return [_cell_row(r) for r in self.conn.execute(q, (status,) if status else ())]

    def begin_cell(self, key: str, *, dataset: str, defense: str, attack: str, threat: str,
                   eps: float, n_batches: int, spec: dict, provenance: dict) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT OR IGNORE INTO cells (key, dataset, defense, attack, threat, eps, status, "
                "n_batches, spec, provenance, created) VALUES (?,?,?,?,?,?,'running',?,?,?,?)",
                (key, dataset, defense, attack, threat, float(eps), n_batches, _dumps(spec),
                 _dumps(provenance), time.time()))

    def done_batches(self, key: str) -> set[int]:
        return {r[0] for r in self.conn.execute("SELECT batch FROM batches WHERE cell_key=?",
                                                (key,))}

    def add_batch(self, key: str, batch: int, rows: Iterable[SampleRow | Mapping[str, Any]], *,
                  adv_path: str | None,
                  adv_sha256: str | None, wall_time: float, extras: dict | None = None) -> bool:
        """Insert a batch and its sample rows atomically; False if it was already there."""
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM batches WHERE cell_key=? AND batch=?",
                         (key, batch)).fetchone():
                return False
            c.execute("INSERT INTO batches VALUES (?,?,?,?,?,?)",
                      (key, batch, adv_path, adv_sha256, wall_time, _dumps(extras or {})))
            placeholders = ",".join("?" * (len(SAMPLE_FIELDS) + 1))
            c.executemany(f"INSERT INTO samples (cell_key, {', '.join(SAMPLE_FIELDS)}) "
                          f"VALUES ({placeholders})",
                          [(key, *[_py(r.get(f)) for f in SAMPLE_FIELDS]) for r in rows])
        return True

    def finish_cell(self, key: str, *, flags: list, metrics: dict, provenance: dict) -> None:
        with self.transaction() as c:
            shas = [r[0] or "" for r in c.execute(
                "SELECT adv_sha256 FROM batches WHERE cell_key=? ORDER BY batch", (key,))]
            agg = text_sha256("".join(shas))
            tot = c.execute("SELECT SUM(wall_time) FROM batches WHERE cell_key=?",
                            (key,)).fetchone()[0]
            fb = c.execute("SELECT SUM(forward_passes), SUM(backward_passes) FROM samples "
                           "WHERE cell_key=?", (key,)).fetchone()
            c.execute("UPDATE cells SET status='done', flags=?, metrics=?, provenance=?, "
                      "adv_sha256=?, wall_time=?, forward_passes=?, backward_passes=?, finished=? "
                      "WHERE key=?", (_dumps(flags), _dumps(metrics), _dumps(provenance), agg,
                                      tot or 0.0, fb[0] or 0, fb[1] or 0, time.time(), key))

    def set_flags(self, key: str, flags: list, *, scope: str) -> None:
        """Replace the flags of ``scope`` (e.g. "matrix": checks across cells, recomputed at the
        end of every run) on a cell, keeping its other flags."""
        with self.transaction() as c:
            row = c.execute("SELECT flags FROM cells WHERE key=?", (key,)).fetchone()
            if row is None:
                return
            kept = [f for f in json.loads(row[0] or "[]") if f.get("scope") != scope]
            new = [{**f, "scope": scope} for f in flags]
            c.execute("UPDATE cells SET flags=? WHERE key=?", (_dumps(kept + new), key))

    def samples(self, key: str) -> list[dict]:
        return [dict(r) for r in self.conn.execute(
            "SELECT * FROM samples WHERE cell_key=? ORDER BY idx", (key,))]

    def batch_extras(self, key: str) -> list[dict]:
        return [json.loads(r[0] or "{}") for r in self.conn.execute(
            "SELECT extras FROM batches WHERE cell_key=? ORDER BY batch", (key,))]

    def batches(self, key: str) -> list[dict]:
        return [dict(r) for r in self.conn.execute(
            "SELECT * FROM batches WHERE cell_key=? ORDER BY batch", (key,))]

    def current_keys(self) -> set[str]:
        """The newest finished cell per (dataset, defense, attack, threat, eps): a run directory
        run again after a defense's or an attack's configuration changed holds the old cells and
        the new ones under the same labels; only the newest are current (tables, matrix flags)."""
        newest: dict[tuple, tuple[float, str]] = {}
        for key, *ident, finished in self.conn.execute(
                "SELECT key, dataset, defense, attack, threat, eps, COALESCE(finished, created) "
                "FROM cells WHERE status='done' ORDER BY created"):
            ident = (*ident[:4], round(float(ident[4]), 8))
            if ident not in newest or (finished or 0) >= newest[ident][0]:
                newest[ident] = (finished or 0, key)
        return {k for _, k in newest.values()}

    def samples_frame(self):
        """All samples of finished cells joined with their cell columns (a pandas DataFrame)."""
        import pandas as pd

        return pd.read_sql_query(
            "SELECT c.key AS cell_key, c.dataset, c.defense, c.attack, c.threat, c.eps, s.* "
            "FROM samples s JOIN cells c ON c.key = s.cell_key WHERE c.status='done'", self.conn
        ).loc[:, lambda df: ~df.columns.duplicated()]

    def counts(self) -> dict[str, int]:
        return {t: self.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("cells", "batches", "samples")}


def _cell_row(r: sqlite3.Row) -> CellRow:
    return CellRow(key=r["key"], dataset=r["dataset"], defense=r["defense"], attack=r["attack"],
                   threat=r["threat"], eps=r["eps"], status=r["status"], n_batches=r["n_batches"],
                   spec=json.loads(r["spec"] or "{}"),
                   provenance=json.loads(r["provenance"] or "{}"),
                   flags=json.loads(r["flags"] or "[]"), metrics=json.loads(r["metrics"] or "{}"),
                   adv_sha256=r["adv_sha256"], wall_time=r["wall_time"],
                   forward_passes=r["forward_passes"], backward_passes=r["backward_passes"])


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, allow_nan=True)


def _py(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, bool):
        return int(v)
    return v
