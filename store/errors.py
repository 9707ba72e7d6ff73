"""The store's error classes.

Every error the store raises on purpose carries one clear sentence that names the file, row or
argument involved. Argument validation raises :class:`ValueError` (or :class:`TypeError`), as
everywhere in the project; everything about the database itself raises a :class:`StoreError`.
"""

from __future__ import annotations


class StoreError(Exception):
    """The database cannot be used as asked (bad file, newer schema, locked, missing row...)."""


class NotFoundError(StoreError, LookupError):
    """A row asked for by id does not exist."""

    def __init__(self, table: str, row_id: object) -> None:
        self.table = table
        self.row_id = row_id
        super().__init__(f"{table} row {row_id} does not exist in the store")


class BlobIntegrityError(StoreError):
    """A stored blob's sha256 no longer matches the hash recorded beside it.

    The store never repairs or regenerates such a blob silently: the row is named so the user can
    restore the database from a backup (or delete the row on purpose).
    """

    def __init__(self, table: str, row_id: int, detail: str) -> None:
        self.table = table
        self.row_id = row_id
        super().__init__(
            f"{table} row {row_id} is corrupted ({detail}); it was not regenerated or changed, "
            "restore the database from a backup or delete that row"
        )


class NoiseIntegrityError(BlobIntegrityError):
    """A stored noise tensor failed its sha256, shape or dtype check."""

    def __init__(self, row_id: int, detail: str) -> None:
        super().__init__("noise", row_id, detail)


class JobStateError(StoreError):
    """A refine job (or training run) transition that its state machine does not allow."""
