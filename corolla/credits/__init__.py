"""Credits for contributors: signed work receipts (receipts.py), a local ledger (ledger.py), each server's own
view of who has standing (standing.py), and the server's and the client's sides of it (book.py, payer.py).
The rules and the threat model: docs/incentives.md."""
