"""A peer's persistent credits ledger (SQLite): receipts it earned (as a server), receipts it signed (as a
client), and the work it served to each client peer (peers the book forgot in one row; ledgers from before clients
signed for forwards and backwards also have a row of that work). One file per peer identity; it survives restarts.

Only the latest receipt per (direction, swarm, payer, payee) is kept: receipts are cumulative."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from corolla.net.messages import WorkReceipt
from corolla.net.wire import decode, encode

EARNED, SIGNED = "earned", "signed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    direction TEXT NOT NULL, swarm TEXT NOT NULL, payer TEXT NOT NULL, payee TEXT NOT NULL,
    block_tokens INTEGER NOT NULL, sequence INTEGER NOT NULL, time REAL NOT NULL, encoded BLOB NOT NULL,
    PRIMARY KEY (direction, swarm, payer, payee));
CREATE TABLE IF NOT EXISTS served (
    swarm TEXT NOT NULL, peer TEXT NOT NULL, block_tokens INTEGER NOT NULL, PRIMARY KEY (swarm, peer));
"""


class Ledger:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        # One connection, used from the event loop's thread (and tests); the lock makes other threads safe too.
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit is durable at the next checkpoint; a crash may lose the last moments, never corrupt.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def put(self, direction: str, receipt: WorkReceipt) -> None:
        """Keep `receipt` as the latest of its (direction, swarm, payer, payee)."""
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (direction, receipt.swarm, receipt.payer, receipt.payee, receipt.block_tokens,
                              receipt.sequence, receipt.time, encode(receipt)))

    def receipts(self, direction: str, swarm: str | None = None) -> list[WorkReceipt]:
        query = "SELECT encoded FROM receipts WHERE direction = ?" + (" AND swarm = ?" if swarm else "")
        with self._lock:
            rows = self._db.execute(query, (direction, swarm) if swarm else (direction,)).fetchall()
        return [decode(bytes(row[0])) for row in rows]

    def add_served(self, swarm: str, counts: dict[str, int]) -> None:
        """Add block-tokens served to each client peer."""
        with self._lock, self._db:
            self._db.executemany("INSERT INTO served VALUES (?, ?, ?) ON CONFLICT (swarm, peer) DO UPDATE SET "
                                 "block_tokens = block_tokens + excluded.block_tokens",
                                 [(swarm, peer, n) for peer, n in counts.items() if n])

    def forget_served(self, swarm: str, peer: str, into: str) -> None:
        """Move `peer`'s served count into the row `into` (work kept in the total, not per peer)."""
        with self._lock, self._db:
            row = self._db.execute("SELECT block_tokens FROM served WHERE swarm = ? AND peer = ?",
                                   (swarm, peer)).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM served WHERE swarm = ? AND peer = ?", (swarm, peer))
            self._db.execute("INSERT INTO served VALUES (?, ?, ?) ON CONFLICT (swarm, peer) DO UPDATE SET "
                             "block_tokens = block_tokens + excluded.block_tokens", (swarm, into, row[0]))

    def served(self, swarm: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT peer, block_tokens FROM served WHERE swarm = ?", (swarm,)).fetchall()
        return dict(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
