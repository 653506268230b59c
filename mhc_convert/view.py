"""The lazy tensor view every format reader produces and every writer consumes.

A reader parses only metadata (headers, ``.metadata``, pickled dict structure) and returns a
``CheckpointView``: one ``Entry`` per stored key, each knowing where its bytes live. Nothing is
decoded until ``load`` / ``read_bytes`` is called, so planning a 100 GB conversion touches
kilobytes. Writers receive ``OutItem``s: an output key plus either a source ``Entry`` (copied
byte-for-byte) or a new in-memory value. Readers and writers know nothing about mHC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from mhc_convert.formats.byte_sources import tensor_slices

if TYPE_CHECKING:  # torch is imported where tensors are made, not at import
    import torch

EntryKind = Literal["tensor", "bytes", "object"]


@dataclass(frozen=True)
class Entry:
    """One stored item. ``dtype`` is a torch dtype name ("bfloat16") for tensors, None otherwise.
    ``locator`` is private to the format (file, offset, length, chunk list, ...)."""

    key: str
    kind: EntryKind
    dtype: str | None
    shape: tuple[int, ...]
    nbytes: int
    locator: Any = field(compare=False, repr=False)


@dataclass(frozen=True)
class OutItem:
    """One item of the output. Exactly one of ``source`` / ``value`` is set.
    ``source``: copy that entry's stored bytes unchanged under the new key.
    ``value``: a new ``torch.Tensor`` (tensor kinds) or ``bytes`` (byte blobs)."""

    key: str
    source: Entry | None = None
    value: torch.Tensor | bytes | None = None

    def __post_init__(self) -> None:
        if (self.source is None) == (self.value is None):
            raise ValueError(f"OutItem {self.key!r}: exactly one of source/value must be set")


class StoredRange(NamedTuple):
    """Where raw element bytes of a tensor lie, unencoded, in a file: ``length`` bytes at the
    absolute ``offset`` of ``path`` (what a writer copying that file streams). ``name`` is the
    file an error should name (the shard as the index spells it)."""

    path: Path
    offset: int
    length: int
    name: Path


ProgressFn = Callable[[int], None]  # called with a number of bytes just processed
# (file that holds them, raw uint8 slices) for every stored piece of an entry
ByteSources = Callable[[Entry], Iterator[tuple[Path, Iterable["torch.Tensor"]]]]


@dataclass
class CheckpointView:
    """What a reader returns. ``meta`` holds format facts the engine needs (``config_json`` for
    native, ``common_state``/``iteration``/``tracker`` for Megatron, ...), already parsed with
    safe loaders. ``loader`` decodes one entry on demand. ``sources`` streams an entry's stored
    bytes (default: decode it and stream the tensor); ``locate`` names the file a user should
    look at for a key (default: none beyond the checkpoint). ``ranges`` lists where an entry's
    raw bytes lie in the source files, when they lie there plainly (None: they do not, e.g. a
    pickled legacy tensor), so a copy can check them as it streams them (``validate``)."""

    format: Literal["native", "torch_dist", "torch_legacy"]
    path: Path
    entries: Mapping[str, Entry]
    meta: dict[str, Any]
    loader: Callable[[Entry], torch.Tensor | bytes | Any] = field(repr=False)
    sources: ByteSources | None = field(default=None, repr=False)
    locate: Callable[[Entry], Path | None] | None = field(default=None, repr=False)
    ranges: Callable[[Entry], list[StoredRange] | None] | None = field(default=None, repr=False)

    def load(self, key: str) -> torch.Tensor | bytes | Any:
        return self.loader(self.entries[key])

    def byte_sources(self, entry: Entry) -> Iterator[tuple[Path, Iterable[torch.Tensor]]]:
        if self.sources is not None:
            return self.sources(entry)
        return iter([(Path(self.path), tensor_slices(self.loader(entry)))])

    def stored_ranges(self, entry: Entry) -> list[StoredRange] | None:
        return self.ranges(entry) if self.ranges is not None else None

    def file_of(self, key: str) -> Path | None:
        """The file holding ``key`` (the native shard, the torch_dist ``.metadata`` where keys
        and shapes are recorded, the legacy rank file), or None."""
        return self.locate(self.entries[key]) if self.locate is not None else None

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())
