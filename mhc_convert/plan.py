"""The planner: a pure function from (source keys and shapes, config, direction) to an explicit
per-key plan. Every source key is consumed exactly once; unknown keys, missing keys, shapes that
contradict the config, mixed layouts and collisions are errors that list what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from mhc_convert import layout as L
from mhc_convert.errors import AlreadyInLayoutError, InvalidInputError
from mhc_model.config import HybridConfig

Direction = Literal["enable", "disable"]
Shape = tuple[int, ...] | None  # None for byte objects


@dataclass(frozen=True)
class Rename:
    src: str
    dst: str


@dataclass(frozen=True)
class Add:
    """A new tensor. ``what`` is ("hc", layer, name) or ("head", None, name); ``opt_state`` is
    None for the model value or the optimizer state name (fp32_param, exp_avg, ...)."""

    dst: str
    what: tuple[str, int | None, str]
    opt_state: str | None
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Drop:
    """Dropped only after the engine checked the disable is exact (or --allow-lossy)."""

    src: str
    what: tuple[str, int | None, str]
    opt_state: str | None


@dataclass(frozen=True)
class Plan:
    direction: Direction
    renames: tuple[Rename, ...]
    adds: tuple[Add, ...]
    drops: tuple[Drop, ...]
    opt_states: tuple[str, ...]
    passthrough: tuple[str, ...] = field(default=())

    @property
    def output_keys(self) -> list[str]:
        return [r.dst for r in self.renames] + [a.dst for a in self.adds]

    def summary(self) -> dict[str, int]:
        moved = sum(r.src != r.dst for r in self.renames)
        return {"renamed": moved, "unchanged": len(self.renames) - moved,
                "added": len(self.adds), "dropped": len(self.drops)}


@lru_cache(maxsize=64)
def expected_model_shapes(cfg: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the mHC-off model for this config (built on the meta device)."""
    from mhc_model.model import meta_model

    model = meta_model(cfg.with_mhc(enable_hyper_connections=False))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class _Parsed:
    opt_state: str | None
    layer: int | None
    segment: Literal["plain", "inner", "hc", "head", "global", "opaque", "passthrough"]
    rel: str  # layer-relative suffix (after the wrapper segment) or the full model key


def _check_layer_suffix(cfg, symbol, rel, shape, expected, key, path) -> None:
    """rel must be a key of this symbol's layer, a factory split of one, or an _extra_state."""
    base_m = L.SHARD_RE.match(rel)
    if base_m:
        rel_noshard = base_m.group(1)
        if not rel_noshard.endswith("." + L.EXTRA_STATE):
            raise InvalidInputError("'/shard_*' suffix on a non-_extra_state key", path=path,
                                    key=key)
        rel = rel_noshard
    if rel.endswith("." + L.EXTRA_STATE):
        module = rel[: -len(L.EXTRA_STATE) - 1]
        if not any(s.startswith(module + ".") for s in expected):
            raise InvalidInputError(f"unknown _extra_state for layer symbol {symbol!r}",
                                    path=path, key=key)
        return
    if rel in expected:
        if shape is not None and tuple(shape) != expected[rel]:
            raise InvalidInputError(f"shape {list(shape)} contradicts the config "
                                    f"(expected {list(expected[rel])})", path=path, key=key)
        return
    base, _, part = rel.rpartition(".")
    splits = L.split_table(cfg, symbol).get(base)
    if splits is not None and base in expected:
        rows = dict(splits).get(part)
        if rows is not None:
            want = (rows, *expected[base][1:])
            if shape is not None and tuple(shape) != want:
                raise InvalidInputError(f"shape {list(shape)} contradicts the config "
                                        f"(expected {list(want)})", path=path, key=key)
            return
    raise InvalidInputError(f"not a key of a {symbol!r} layer", path=path, key=key)


def _parse(key: str, shape: Shape, cfg: HybridConfig, expected: dict, passthrough, path) -> _Parsed:
    opt_m = L.OPT_RE.match(key)
    opt_state, model_key = (opt_m.group(1), opt_m.group(2)) if opt_m else (None, key)
    if opt_state is None and L.MEGATRON_OPAQUE_RE.match(key):
        return _Parsed(None, None, "opaque", key)
    if model_key in L.NON_LAYER_KEYS and model_key in expected:
        if shape is not None and tuple(shape) != expected[model_key]:
            raise InvalidInputError(f"shape {list(shape)} contradicts the config "
                                    f"(expected {list(expected[model_key])})", path=path, key=key)
        return _Parsed(opt_state, None, "global", model_key)
    if model_key.startswith(L.HEAD_PREFIX + "hc_head_"):
        return _Parsed(opt_state, None, "head", model_key[len(L.HEAD_PREFIX):])
    layer_m = L.LAYER_RE.match(model_key)
    if layer_m and int(layer_m.group(1)) < cfg.num_layers:
        i, rest = int(layer_m.group(1)), layer_m.group(2)
        symbol = cfg.layer_symbols[i]
        layer_expected = expected_layer(cfg, i, expected)
        if rest.startswith(L.HC + "."):
            name = rest[len(L.HC) + 1:]
            hc_shapes = {k.rsplit(f"{L.HC}.", 1)[1]: s for k, s in L.hc_keys(i, cfg).items()}
            if name not in hc_shapes:
                raise InvalidInputError("unknown hyper_connection parameter", path=path, key=key)
            return _Parsed(opt_state, i, "hc", name)
        segment = "plain"
        if rest.startswith(L.INNER + "."):
            segment, rest = "inner", rest[len(L.INNER) + 1:]
        rest = L.canonical(rest)
        _check_layer_suffix(cfg, symbol, rest, shape, layer_expected, key, path)
        return _Parsed(opt_state, i, segment, rest)
    if passthrough is not None and passthrough.search(key):
        return _Parsed(opt_state, None, "passthrough", key)
    raise InvalidInputError("unknown key (not part of the configured model; pass "
                            "--passthrough REGEX to carry it unchanged)", path=path, key=key)


def expected_layer(cfg: HybridConfig, i: int, expected: dict) -> dict[str, tuple[int, ...]]:
    prefix = f"decoder.layers.{i}."
    return {k[len(prefix):]: s for k, s in expected.items() if k.startswith(prefix)}


def make_plan(
    keys: Mapping[str, Shape],
    cfg: HybridConfig,
    direction: Direction,
    target: HybridConfig,
    *,
    passthrough: str | None = None,
    path: str | None = None,
) -> Plan:
    """``cfg`` describes the source model shapes (its mHC fields may be either state);
    ``target`` carries the mHC settings of the output (n, contract) for new parameters."""
    expected = expected_model_shapes(cfg)
    rx = re.compile(passthrough) if passthrough else None
    parsed = {k: _parse(k, s, cfg, expected, rx, path) for k, s in keys.items()}
    layouts = {p.segment for p in parsed.values() if p.segment in ("plain", "inner", "hc", "head")}
    on, off = layouts & {"inner", "hc", "head"}, layouts & {"plain"}
    if on and off:
        bad = sorted(k for k, p in parsed.items() if p.segment == "plain")[:3]
        raise InvalidInputError(f"mixed layout: some layers are wrapped (inner_layer/"
                                f"hyper_connection) and some are not, e.g. {bad}", path=path,
                                key=bad[0] if bad else None)
    source_on = bool(on)
    if direction == "enable" and source_on:
        raise AlreadyInLayoutError("checkpoint is already mHC-on (wrapped layout)", path=path)
    if direction == "disable" and not source_on:
        raise AlreadyInLayoutError("checkpoint is already mHC-off (plain layout)", path=path)
    _check_missing(parsed, expected, cfg, path)
    opt_states = tuple(sorted({p.opt_state for p in parsed.values() if p.opt_state}))
    unknown_states = [s for s in opt_states if s not in L.NEW_PARAM_OPT_STATE]
    if direction == "enable" and unknown_states:
        raise InvalidInputError(f"optimizer state(s) {unknown_states} have no rule for new "
                                f"parameters (known: {sorted(L.NEW_PARAM_OPT_STATE)})", path=path)
    renames, drops, adds = [], [], []
    for key, p in parsed.items():
        if p.segment in ("hc", "head"):
            drops.append(Drop(key, (p.segment, p.layer, p.rel), p.opt_state))
            continue
        if p.segment in ("plain", "inner"):
            model_key = key_strip_opt(key)
            dst = L.wrap(model_key) if direction == "enable" else L.unwrap(model_key)
            dst = f"optimizer.state.{p.opt_state}.{dst}" if p.opt_state else dst
        else:
            dst = key
        renames.append(Rename(key, dst))
    if direction == "enable":
        for state in (None, *opt_states):
            for i in range(cfg.num_layers):
                for k, shape in L.hc_keys(i, target).items():
                    name = k.rsplit(f"{L.HC}.", 1)[1]
                    adds.append(Add(_opt(state, k), ("hc", i, name), state, shape))
            for k, shape in L.head_keys(target).items():
                what = ("head", None, k[len(L.HEAD_PREFIX):])
                adds.append(Add(_opt(state, k), what, state, shape))
    plan = Plan(direction, tuple(renames), tuple(adds), tuple(drops), opt_states,
                tuple(k for k, p in parsed.items() if p.segment == "passthrough"))
    outs = plan.output_keys
    if len(set(outs)) != len(outs):
        dup = sorted({k for k in outs if outs.count(k) > 1})
        raise InvalidInputError(f"output key collision: {dup[:5]}", path=path, key=dup[0])
    return plan


def key_strip_opt(key: str) -> str:
    m = L.OPT_RE.match(key)
    return m.group(2) if m else key


def _opt(state: str | None, key: str) -> str:
    return f"optimizer.state.{state}.{key}" if state else key


def _check_missing(parsed: dict[str, _Parsed], expected: dict, cfg: HybridConfig, path) -> None:
    """Every model key of the config must be present (whole, or as all its factory splits)."""
    present = set()
    for p in parsed.values():
        if p.opt_state is not None:
            continue
        if p.segment == "global":
            present.add(p.rel)
        elif p.segment in ("plain", "inner"):
            present.add(f"decoder.layers.{p.layer}.{p.rel}")
    missing = []
    for key in expected:
        if key in present:
            continue
        m = L.LAYER_RE.match(key)
        if m:
            splits = L.split_table(cfg, cfg.layer_symbols[int(m.group(1))]).get(m.group(2))
            if splits and all(f"{key}.{part}" in present for part, _ in splits):
                continue
        missing.append(key)
    if missing:
        raise InvalidInputError(f"{len(missing)} model key(s) of the configured model are "
                                f"missing, e.g. {missing[:3]}", path=path, key=missing[0])
