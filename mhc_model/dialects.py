"""The ``hybrid_layer_pattern`` grammar of each Megatron-LM branch, as data (DESIGN.md §2;
research/megatron-interop.md §2).

A pattern is ``<main>[/<mtp>/<mtp>...]``: ``|`` in the main part marks pipeline-stage
boundaries, each part after ``/`` is one multi-token-prediction depth and all of them must be
the same string. Branches differ only in the layer symbols they accept and in which symbols are
"MLA-like" (may not share a part with standard attention ``*``):

| branch | symbols | MLA-like (never with ``*``) | ``hybrid_layer_allocation.py`` |
|---|---|---|---|
| main | ``M G * D + - E`` | ``D +`` | main ``Symbols``, ``_validate_pattern`` |
| dev | ``M G * D C H W - E`` | ``D C H W`` | dev (d48bd6be) ``:14-30, 300-305`` |
| dsv4 | ``M G * D C H - E`` | ``D C H`` | dsv4 (26b830a6) ``:14-27, 297-302`` |

``split_pattern`` follows Megatron's ``parse_hybrid_pattern`` (all three branches share its
structure): no ``/`` -> the whole string is the main part (it may be empty); otherwise the main
part is checked only when non-empty, parts after ``/`` that are all empty mean "no MTP", unequal
MTP parts are an error, an MTP part may not hold ``|``; the MLA rule is checked per part (the
main part as a whole, pipes included). Megatron returns ``None`` for an empty main part after a
``/``; ``ParsedPattern.main`` does the same.

This module imports nothing from the project (``specs``/``config`` may import it).
"""

from __future__ import annotations

from dataclasses import dataclass

PIPE = "|"
MTP_SEPARATOR = "/"


@dataclass(frozen=True)
class Dialect:
    branch: str
    symbols: frozenset[str]
    mla_like: frozenset[str]  # symbols that may not share a pattern part with ATTENTION
    attention: str = "*"


DIALECTS: dict[str, Dialect] = {d.branch: d for d in (
    Dialect("main", frozenset("MG*D+-E"), frozenset("D+")),
    Dialect("dev", frozenset("MG*DCHW-E"), frozenset("DCHW")),
    Dialect("dsv4", frozenset("MG*DCH-E"), frozenset("DCH")),
)}


@dataclass(frozen=True)
class ParsedPattern:
    """``main``: the main decoder part with its ``|`` (None when a ``/`` follows an empty one,
    as Megatron); ``stages``: the main part split at ``|``; ``mtp``: one depth's pattern (None
    without MTP); ``mtp_depths``: how many depths."""

    main: str | None
    mtp: str | None
    mtp_depths: int

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple((self.main or "").split(PIPE))

    @property
    def main_symbols(self) -> tuple[str, ...]:
        return tuple(c for c in (self.main or "") if c != PIPE)

    @property
    def mtp_symbols(self) -> tuple[str, ...]:
        return tuple(self.mtp or "")


def dialect(branch: str) -> Dialect:
    if branch not in DIALECTS:
        raise ValueError(f"unknown Megatron branch {branch!r}; known: {', '.join(DIALECTS)}")
    return DIALECTS[branch]


def _check_part(pattern: str, part: str, what: str, symbols: frozenset[str],
                mla_like: frozenset[str], allow_pipe: bool) -> None:
    valid = symbols | {PIPE} if allow_pipe else symbols
    bad = sorted({c for c in part if c not in valid})
    if bad:
        raise ValueError(f"hybrid_layer_pattern={pattern!r}: in the {what} part, symbol(s) "
                         f"{bad} are not valid; valid: {sorted(valid)}")
    if "*" in part and mla_like & set(part):
        raise ValueError(f"hybrid_layer_pattern={pattern!r}: the {what} part mixes standard "
                         f"attention '*' with MLA-like {sorted(mla_like & set(part))}")


def split_pattern(pattern: str, symbols: frozenset[str] | set[str],
                  mla_like: frozenset[str] | set[str] = frozenset()) -> ParsedPattern:
    """Structure of ``pattern`` for a grammar accepting ``symbols`` (see the module docstring).
    Raises ``ValueError`` naming the pattern where Megatron's parser raises."""
    symbols, mla_like = frozenset(symbols), frozenset(mla_like)
    parts = pattern.split(MTP_SEPARATOR)
    main = parts[0]
    if len(parts) == 1 or main:
        _check_part(pattern, main, "main", symbols, mla_like, allow_pipe=True)
    if len(parts) == 1:
        return ParsedPattern(main, None, 0)
    mtp_parts = parts[1:]
    if all(p == "" for p in mtp_parts):
        return ParsedPattern(main or None, None, 0)
    first = mtp_parts[0]
    for i, part in enumerate(mtp_parts[1:], start=2):
        if part != first:
            raise ValueError(f"hybrid_layer_pattern={pattern!r}: every MTP part must be the "
                             f"same; part 1 is {first!r}, part {i} is {part!r}")
    _check_part(pattern, first, "MTP", symbols, mla_like, allow_pipe=False)
    return ParsedPattern(main or None, first, len(mtp_parts))


def parse_for_branch(pattern: str, branch: str) -> ParsedPattern:
    """``pattern`` as Megatron's ``parse_hybrid_pattern`` on ``branch`` reads it (raises
    ``ValueError`` where it does)."""
    d = dialect(branch)
    return split_pattern(pattern, d.symbols, d.mla_like)


def branches_accepting(symbol: str) -> tuple[str, ...]:
    """The branches whose grammar has the layer symbol ``symbol``."""
    return tuple(b for b, d in DIALECTS.items() if symbol in d.symbols)
