"""The planner: a pure function from (source keys and shapes, config, direction) to an explicit
per-key plan (DESIGN.md §3, §5). Every source key is consumed exactly once; unknown keys,
missing keys, shapes that contradict the config, mixed layouts and collisions are errors that
list what is wrong. The converter applies a plan to a lazy checkpoint view, the load shim to a
state dict and the sharded loader to a DCP load: one plan, so the routes cannot disagree.

``strict=False`` plans whatever keys are there (the shim: ``load_state_dict`` reports missing,
unexpected and mis-shaped keys itself): unknown keys are renamed like their neighbours or
carried, nothing is reported missing, shapes are not checked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from mhc_model.config import HybridConfig
from mhc_model.errors import AlreadyInLayoutError, InvalidInputError
from mhc_model.toggle import codec as K
from mhc_model.toggle.shapes import (
    expected_model_shapes,
    hc_keys,
    layer_owns_module,
    mhc_param_shapes,
    mtp_proj_shapes,
    stored_layer_shape,
)

Direction = Literal["enable", "disable"]
Shape = tuple[int, ...] | None  # None for byte objects (or unknown, e.g. TP-sharded legacy)
ParamId = tuple[str, int | None, str]  # ("hc", layer, name) | ("head", None, name)

# what a freshly added parameter gets in each optimizer state: its value, or zeros
NEW_PARAM_OPT_STATE = {"fp32_param": "value", "param": "value", "exp_avg": "zeros",
                       "exp_avg_sq": "zeros"}


@dataclass(frozen=True)
class Rename:
    src: str
    dst: str


@dataclass(frozen=True)
class Add:
    """A new tensor. ``what`` is ("hc", layer, name) or ("head", None, name); ``opt_state`` is
    None for the model value or the optimizer state name (fp32_param, exp_avg, ...)."""

    dst: str
    what: ParamId
    opt_state: str | None
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Drop:
    """Dropped only after the disable verdict found it exact (or the user allowed a loss)."""

    src: str
    what: ParamId
    opt_state: str | None


@dataclass(frozen=True)
class Reshape:
    """An MTP depth's input projection between the layouts (``mhc_model.mtp``): enable splits
    ``eh_proj.weight [C, 2C]`` by columns into ``e_proj.weight``, ``h_proj.weight`` [C, C];
    disable joins them back (``values.reshape_values``). Exact both ways, optimizer states too
    (Adam's state is elementwise)."""

    srcs: tuple[str, ...]
    dsts: tuple[str, ...]
    opt_state: str | None


@dataclass(frozen=True)
class Plan:
    direction: Direction
    renames: tuple[Rename, ...]
    adds: tuple[Add, ...]
    drops: tuple[Drop, ...]
    opt_states: tuple[str, ...]
    passthrough: tuple[str, ...] = field(default=())
    reshapes: tuple[Reshape, ...] = field(default=())

    @property
    def output_keys(self) -> list[str]:
        return ([r.dst for r in self.renames] + [a.dst for a in self.adds]
                + [d for r in self.reshapes for d in r.dsts])

    def summary(self) -> dict[str, int]:
        moved = sum(r.src != r.dst for r in self.renames)
        out = {"renamed": moved, "unchanged": len(self.renames) - moved,
               "added": len(self.adds), "dropped": len(self.drops)}
        if self.reshapes:
            out["reshaped"] = len(self.reshapes)
        return out

    def model_drops(self) -> dict[str, ParamId]:
        """Source key -> parameter id of every dropped model value (what the verdict reads)."""
        return {d.src: d.what for d in self.drops if d.opt_state is None}


# extra: a non-layer module's _extra_state (carried); opaque: Megatron's byte objects
Segment = Literal["plain", "inner", "hc", "head", "global", "extra", "opaque", "passthrough",
                  "mtp_proj"]


@dataclass(frozen=True)
class _Parsed:
    opt_state: str | None
    layer: int | None
    segment: Segment
    rel: str  # layer-relative suffix as stored (after the wrapper segment) or the full key
    # (for "mtp_proj": the depth-relative name; for "head": the head parameter's name, and
    # ``layer`` its MTP depth or None for the decoder's)


def _shape_error(shape, want, key, path) -> InvalidInputError:
    return InvalidInputError(f"shape {list(shape)} contradicts the config "
                             f"(expected {list(want)})", path=path, key=key)


def _check_layer_suffix(cfg, symbol, rel, shape, key, path) -> None:
    """rel must be a key of this symbol's layer in one of Megatron's spellings (ours, an alias,
    a factory split part, a stack: ``shapes.stored_layer_shape``) or an ``_extra_state`` of one
    of its modules."""
    if K.SHARD_RE.match(rel) and not K.is_extra_state(rel):
        raise InvalidInputError("'/shard_*' suffix on a non-_extra_state key", path=path, key=key)
    if K.is_extra_state(rel):
        if not layer_owns_module(cfg, symbol, K.extra_state_module(rel)):
            raise InvalidInputError(f"unknown _extra_state for layer symbol {symbol!r}",
                                    path=path, key=key)
        return
    want = stored_layer_shape(cfg, symbol, rel)
    if want is None:
        raise InvalidInputError(f"not a key of a {symbol!r} layer", path=path, key=key)
    if shape is not None and tuple(shape) != want:
        raise _shape_error(shape, want, key, path)


def _parse(key: str, shape: Shape, cfg: HybridConfig, expected: dict, passthrough, path,
           strict: bool) -> _Parsed:
    opt_state, model_key = K.split_opt(key)
    if opt_state is None and K.MEGATRON_OPAQUE_RE.match(key):
        return _Parsed(None, None, "opaque", key)
    if model_key in K.NON_LAYER_KEYS and model_key in expected:
        if strict and shape is not None and tuple(shape) != expected[model_key]:
            raise _shape_error(shape, expected[model_key], key, path)
        return _Parsed(opt_state, None, "global", model_key)
    if model_key.startswith(K.HEAD_PREFIX):
        return _Parsed(opt_state, None, "head", model_key[len(K.HEAD_PARENT):])
    depth = K.mtp_depth_key(model_key)
    if depth is not None and (depth[0] < cfg.mtp_num_depths or not strict):
        d, name = depth
        if K.is_head_key(model_key):
            return _Parsed(opt_state, d, "head", name)
        part = K.mtp_proj_part(name)
        if part is not None:
            if part[1]:  # the projection linear's _extra_state (a byte object): no shape
                return _Parsed(opt_state, d, "mtp_proj", name)
            want = mtp_proj_shapes(cfg, on=name in K.MTP_PROJ_ON)[name]
            if strict and shape is not None and tuple(shape) != want:
                raise _shape_error(shape, want, key, path)
            return _Parsed(opt_state, d, "mtp_proj", name)
    if (opt_state is None and not K.SITE_RE.match(key) and K.is_extra_state(key)
            and K.is_non_layer_module(K.extra_state_module(key))):
        return _Parsed(None, None, "extra", key)
    found = K.site_of(cfg, model_key)
    if model_key in expected and found is None:  # an MTP depth's norms
        if strict and shape is not None and tuple(shape) != expected[model_key]:
            raise _shape_error(shape, expected[model_key], key, path)
        return _Parsed(opt_state, None, "global", model_key)
    if found and (found[0] is not None or not strict):
        i, rest = found[0], found[2]
        if rest.startswith(K.HC + "."):
            name = rest[len(K.HC) + 1:]
            if strict and K.hc_key(i, name, cfg) not in hc_keys(i, cfg):
                raise InvalidInputError("unknown hyper_connection parameter", path=path, key=key)
            return _Parsed(opt_state, i, "hc", name)
        segment: Segment = "plain"
        if rest.startswith(K.INNER + "."):
            segment, rest = "inner", rest[len(K.INNER) + 1:]
        if strict:
            _check_layer_suffix(cfg, cfg.site_symbols[i], rest, shape, key, path)
        return _Parsed(opt_state, i, segment, rest)
    if not strict or (passthrough is not None and passthrough.search(key)):
        return _Parsed(opt_state, None, "passthrough", key)
    raise InvalidInputError("unknown key (not part of the configured model; pass "
                            "--passthrough REGEX to carry it unchanged)", path=path, key=key)


def make_plan(
    keys: Mapping[str, Shape],
    cfg: HybridConfig,
    direction: Direction,
    target: HybridConfig,
    *,
    passthrough: str | None = None,
    path: str | None = None,
    strict: bool = True,
) -> Plan:
    """``cfg`` describes the source model shapes (its mHC fields may be either state);
    ``target`` carries the mHC settings of the output (n, contract) for new parameters."""
    try:
        expected = expected_model_shapes(cfg)
    except InvalidInputError as e:  # unallocatable sizes: name the checkpoint too
        raise type(e)(e.message, path=path, key=e.key) from None
    rx = re.compile(passthrough) if passthrough else None
    parsed = {k: _parse(k, s, cfg, expected, rx, path, strict) for k, s in keys.items()}
    try:
        source_on = K.layout_of(k for k, p in parsed.items()
                                if p.segment in ("plain", "inner", "hc", "head", "mtp_proj"))
    except InvalidInputError as e:
        raise type(e)(e.message, path=path, key=e.key) from None
    if direction == "enable" and source_on:
        raise AlreadyInLayoutError("checkpoint is already mHC-on (wrapped layout)", path=path)
    if direction == "disable" and not source_on:
        raise AlreadyInLayoutError("checkpoint is already mHC-off (plain layout)", path=path)
    if strict:
        _check_missing(parsed, expected, cfg, path)
    opt_states = tuple(sorted({p.opt_state for p in parsed.values() if p.opt_state}))
    unknown_states = [s for s in opt_states if s not in NEW_PARAM_OPT_STATE]
    if direction == "enable" and unknown_states:
        raise InvalidInputError(f"optimizer state(s) {unknown_states} have no rule for new "
                                f"parameters (known: {sorted(NEW_PARAM_OPT_STATE)})", path=path)
    renames, drops, adds = [], [], []
    for key, p in parsed.items():
        if p.segment == "hc":
            drops.append(Drop(key, K.mhc_param_id(K.split_opt(key)[1], cfg), p.opt_state))
            continue
        if p.segment == "head":
            drops.append(Drop(key, ("head", p.layer, p.rel), p.opt_state))
            continue
        if p.segment == "mtp_proj":
            continue  # planned per depth below (_mtp_reshapes)
        if p.segment in ("plain", "inner"):
            model_key = K.split_opt(key)[1]
            dst = K.wrap(model_key) if direction == "enable" else K.unwrap(model_key)
            dst = K.opt_key(p.opt_state, dst)
        else:
            dst = key
        renames.append(Rename(key, dst))
    if direction == "enable":
        for state in (None, *opt_states):
            for k, shape in mhc_param_shapes(target).items():
                adds.append(Add(K.opt_key(state, k), K.mhc_param_id(k, target), state, shape))
    plan = Plan(direction, tuple(renames), tuple(adds), tuple(drops), opt_states,
                tuple(k for k, p in parsed.items() if p.segment == "passthrough"),
                _mtp_reshapes(parsed, direction, path))
    outs = plan.output_keys
    if len(set(outs)) != len(outs):
        seen: set[str] = set()
        dup = sorted({k for k in outs if k in seen or seen.add(k)})
        raise InvalidInputError(f"output key collision: {dup[:5]}", path=path, key=dup[0])
    return plan


def _mtp_reshapes(parsed: dict[str, _Parsed], direction: Direction, path) -> tuple[Reshape, ...]:
    """One ``Reshape`` per (optimizer state, MTP depth, stored tail): the input projection of
    the source layout into the target's, its weight and (Megatron's torch_dist) its linears'
    ``_extra_state`` byte objects; a depth holding only part of it is refused."""
    have: dict[tuple[str | None, int, str], dict[str, str]] = {}
    for key, p in parsed.items():
        if p.segment == "mtp_proj":
            weight, tail = K.mtp_proj_part(p.rel)
            have.setdefault((p.opt_state, p.layer, tail), {})[weight] = key
    src_names, dst_names = ((K.MTP_PROJ_OFF, K.MTP_PROJ_ON) if direction == "enable"
                            else (K.MTP_PROJ_ON, K.MTP_PROJ_OFF))
    out = []
    for (state, d, tail), names in sorted(have.items(),
                                          key=lambda kv: (kv[0][0] or "", kv[0][1], kv[0][2])):
        if set(names) != set(src_names):
            first = next(iter(names.values()))
            raise InvalidInputError(f"MTP depth {d}'s input projection is stored as "
                                    f"{sorted(names)}{' (' + tail + ')' if tail else ''}; "
                                    f"expected {list(src_names)}", path=path, key=first)
        dsts = tuple(K.opt_key(state, f"mtp.layers.{d}.{n.removesuffix('.weight') + tail}"
                               if tail else f"mtp.layers.{d}.{n}") for n in dst_names)
        out.append(Reshape(tuple(names[n] for n in src_names), dsts, state))
    return tuple(out)


def plan_for_model(keys: Mapping[str, Shape], cfg: HybridConfig, *,
                   strict: bool = False) -> Plan | None:
    """The plan that brings ``keys`` into the layout of a model of ``cfg`` (the in-process
    toggle), or None when they are in it already (or hold no layer key)."""
    source_on = K.layout_of(keys)
    if source_on is None or source_on == cfg.mhc_on:
        return None
    return make_plan(keys, cfg, "enable" if cfg.mhc_on else "disable", cfg, strict=strict)


def _check_missing(parsed: dict[str, _Parsed], expected: dict, cfg: HybridConfig, path) -> None:
    """Every model key of the config must be stored exactly once (whole, as all its factory
    splits, as a row of a stack, or under an alias)."""
    present = []
    for p in parsed.values():
        if p.opt_state is not None:
            continue
        if p.segment == "global":
            present.append(p.rel)
        elif p.segment in ("plain", "inner") and not K.is_extra_state(p.rel):
            present.append(K.site_prefix(cfg, p.layer) + p.rel)
        elif p.segment == "mtp_proj" and p.rel in K.MTP_PROJ_OFF:
            present.append(f"mtp.layers.{p.layer}.{p.rel}")
        elif p.segment == "mtp_proj" and p.rel == K.MTP_PROJ_ON[0]:
            # mHC-on: e_proj + h_proj hold eh_proj (a lone half is refused by _mtp_reshapes)
            present.append(f"mtp.layers.{p.layer}.{K.MTP_PROJ_OFF[0]}")
    try:
        merged = K.model_sources(present, cfg)
    except InvalidInputError as e:
        raise type(e)(e.message, path=path, key=e.key) from None
    missing = [key for key in expected if key not in merged]
    if missing:
        raise InvalidInputError(f"{len(missing)} model key(s) of the configured model are "
                                f"missing, e.g. {missing[:3]}", path=path, key=missing[0])
