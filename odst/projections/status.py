"""What the rest of a site may ask of the projection: how far it has folded each stream.

Two implementations, contract-tested together (tests/system/test_contracts.py): ``Projector``
(this process folds the streams) and ``ReadModelWatcher`` (another process does; this one
polls the read model it writes).
"""

from __future__ import annotations

from typing import Protocol


class ProjectionStatus(Protocol):
    error: str | None  # why folding last failed, None while it works

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def add_stream(self, stream: str) -> None:
        """Fold another stream (a peer's mirror) too."""

    def checkpoint(self, stream: str) -> int:
        """The stream sequence folded up to (0: nothing yet)."""

    async def wait_for(self, stream: str, seq: int, timeout: float = 10.0) -> bool:
        """True once ``checkpoint(stream) >= seq``; False after ``timeout`` (read-your-writes)."""

    async def wait_changed(self, timeout: float) -> None:
        """Return when something was folded, or after ``timeout`` (never raises on timeout)."""

    async def lag(self) -> dict[str, int]:
        """Messages stored in each stream and not folded yet (asks the broker)."""
