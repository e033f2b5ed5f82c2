"""Weight names: one table per foreign layout, read one way to import and the other to export."""

from __future__ import annotations

from dataclasses import dataclass

Pairs = tuple[tuple[str, str], ...]  # (fastclip's spelling, the other layout's)


@dataclass(frozen=True)
class KeyMap:
    """fastclip's weight names against another layout's: the first matching prefix pair is
    swapped, then every substitution applies inside transformer blocks."""

    prefixes: Pairs
    block: Pairs

    def to_fastclip(self, key: str) -> str:
        """The fastclip name of the other layout's ``key``."""
        return self._rename(key, src=1, dst=0)

    def from_fastclip(self, key: str) -> str:
        """The other layout's name of fastclip's ``key``."""
        return self._rename(key, src=0, dst=1)

    def _rename(self, key: str, src: int, dst: int) -> str:
        for pair in self.prefixes:
            if key.startswith(pair[src]):
                key = pair[dst] + key[len(pair[src]) :]
                break
        if ".blocks." in key or ".layers." in key or ".resblocks." in key:
            for pair in self.block:
                key = key.replace(pair[src], pair[dst])
        return key
