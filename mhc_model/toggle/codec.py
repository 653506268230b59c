"""The key codec of the mHC toggle (DESIGN.md §3, §5): every rule about key *names*.

mHC off: ``decoder.layers.N.X``; mHC on: ``decoder.layers.N.inner_layer.X`` plus
``decoder.layers.N.hyper_connection.*`` and, with the learned contract, ``decoder.hc_head_*``.
Around those, per layer symbol (``LayerSpec``): Megatron's other spellings of a layer key
(``aliases``), its factory splits (``in_proj.weight.z`` ...: the rows of one model tensor stored
as several items), its stacks (``mlp.experts.experts.linear_fc1.weight``: one stored tensor for
E model tensors); and ``_extra_state[/shard_*]`` byte objects, the optimizer namespace
``optimizer.state.<name>.<model key>`` and the byte objects Megatron keeps beside the model.
``layout_of`` is the one layout detector.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mhc_model.errors import InvalidInputError, MixedLayoutError
from mhc_model.specs import LAYER_SPECS, Splits, Stacks

if TYPE_CHECKING:  # annotations only: the codec works on key strings
    from torch import Tensor

LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# A layer inside MTP depth d: mtp.layers.{d}.mtp_model_layer.layers.{k}.X (mhc_model.mtp)
MTP_SITE_RE = re.compile(r"^mtp\.layers\.(\d+)\.mtp_model_layer\.layers\.(\d+)\.(.+)$")
# Any layer of either kind: (prefix up to the layer number and its dot, rest)
SITE_RE = re.compile(r"^(decoder\.layers\.\d+\.|mtp\.layers\.\d+\.mtp_model_layer\.layers\.\d+\.)"
                     r"(.+)$")
MTP_DEPTH_RE = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")
INNER = "inner_layer"
HC = "hyper_connection"
HEAD_PREFIX = "decoder.hc_head_"
HEAD_PARENT = "decoder."  # hc_head_* are parameters of the decoder (HybridStack)
HEAD_NAME_PREFIX = "hc_head_"
NON_LAYER_KEYS = ("embedding.word_embeddings.weight", "decoder.final_norm.weight",
                  "output_layer.weight")
# An MTP depth's own keys besides its layers and head (both layouts), and its input
# projection in each layout (mhc_model.mtp): eh_proj [C, 2C] = [e_proj | h_proj] by columns
MTP_NORMS = ("enorm.weight", "hnorm.weight", "final_layernorm.weight")
MTP_PROJ_OFF = ("eh_proj.weight",)
MTP_PROJ_ON = ("e_proj.weight", "h_proj.weight")

# optimizer.state.<name>.<model key> (Megatron fully_reshardable model space; native too)
OPT_RE = re.compile(r"^optimizer\.state\.([A-Za-z0-9_]+)\.(.+)$")
# Megatron ShardedObject suffix on byte objects, e.g. "_extra_state/shard_0_1"
SHARD_RE = re.compile(r"^(.*?)(/shard_[0-9._]+)$")
EXTRA_STATE = "_extra_state"
# Byte objects Megatron keeps beside the model: carried unchanged, except common_state whose
# args the converter rewrites (rng_state/shard_<pp>.<tp>_<PP>.<TP>, rerun_state_machine_state/
# shard_<rank>_<ranks> in megatron-core >= 0.13).
MEGATRON_OPAQUE_RE = re.compile(
    r"^(rng_state|common_state|rerun_state_machine_state)(/shard_[0-9._]+)?$")


def layer_symbol(cfg, layer: int | None) -> str | None:
    """The pattern symbol of site ``layer`` (``HybridConfig.site_symbols``: the decoder's
    layers, then the MTP depths'); None beyond the configured ones."""
    if layer is None:
        return None
    sites = cfg.site_symbols
    return sites[layer] if 0 <= layer < len(sites) else None


def site_prefix(cfg, site: int) -> str:
    """The key prefix of site ``site``: ``decoder.layers.N.`` or, past the decoder, MTP depth
    d's layer k ``mtp.layers.d.mtp_model_layer.layers.k.``."""
    if site < cfg.num_layers:
        return f"decoder.layers.{site}."
    d, k = divmod(site - cfg.num_layers, len(cfg.mtp_symbols))
    return f"mtp.layers.{d}.mtp_model_layer.layers.{k}."


def site_of(cfg, key: str) -> tuple[int | None, str, str] | None:
    """(site, prefix, rest) of a layer key of either kind; site None when the layer is not
    one of ``cfg``'s; None for a key that is not a layer key."""
    m = LAYER_RE.match(key)
    if m:
        i = int(m.group(1))
        return (i if i < cfg.num_layers else None), f"decoder.layers.{i}.", m.group(2)
    m = MTP_SITE_RE.match(key)
    if m:
        d, k, P = int(m.group(1)), int(m.group(2)), len(cfg.mtp_symbols)
        site = cfg.num_layers + d * P + k if d < cfg.mtp_num_depths and k < P else None
        return site, f"mtp.layers.{d}.mtp_model_layer.layers.{k}.", m.group(3)
    return None


def canonical(symbol: str | None, rel: str) -> str:
    """A layer-relative key of a ``symbol`` layer in Megatron's spelling -> our name
    (``LayerSpec.aliases``; e.g. Mamba ``norm.weight`` -> ``mixer.in_proj.layer_norm_weight``)."""
    return LAYER_SPECS[symbol].canonical(rel) if symbol is not None else rel


def _split_layer_key(cfg, key: str) -> tuple[int | None, str, str, str] | None:
    """<site prefix>[inner_layer.]X -> (site, prefix, "inner_layer." or "", X); None for a key
    that is not a layer key."""
    found = site_of(cfg, key)
    if found is None:
        return None
    site, prefix, rest = found
    inner = INNER + "." if rest.startswith(INNER + ".") else ""
    return site, prefix, inner, rest[len(inner):]


def wrap(key: str) -> str:
    """<layer prefix>X -> <layer prefix>inner_layer.X, for decoder and MTP layers (other keys
    unchanged)."""
    m = SITE_RE.match(key)
    return f"{m.group(1)}{INNER}.{m.group(2)}" if m else key


def unwrap(key: str) -> str:
    """<layer prefix>inner_layer.X -> <layer prefix>X (other keys unchanged)."""
    m = SITE_RE.match(key)
    if m and m.group(2).startswith(INNER + "."):
        return f"{m.group(1)}{m.group(2)[len(INNER) + 1:]}"
    return key


def mtp_depth_key(key: str) -> tuple[int, str] | None:
    """(depth, name) of an MTP depth's own key (``mtp.layers.d.enorm.weight``, its input
    projection, its ``hc_head_*``), None for any other key (its layers included)."""
    if MTP_SITE_RE.match(key):
        return None
    m = MTP_DEPTH_RE.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def is_head_key(key: str) -> bool:
    """``decoder.hc_head_*`` or an MTP depth's ``mtp.layers.d.hc_head_*``."""
    found = mtp_depth_key(key)
    return key.startswith(HEAD_PREFIX) or bool(found and found[1].startswith(HEAD_NAME_PREFIX))


def split_opt(key: str) -> tuple[str | None, str]:
    """``optimizer.state.<name>.<model key>`` -> (name, model key); a model key -> (None, key)."""
    m = OPT_RE.match(key)
    return (m.group(1), m.group(2)) if m else (None, key)


def opt_key(state: str | None, key: str) -> str:
    return f"optimizer.state.{state}.{key}" if state else key


def is_mhc_param(key: str) -> bool:
    """A hyper-connection parameter or a learned contract head (exist only with mHC on)."""
    m = SITE_RE.match(key)
    return is_head_key(key) or bool(m and m.group(2).startswith(HC + "."))


def hc_key(layer: int, name: str, cfg=None) -> str:
    """Site ``layer``'s hyper-connection parameter ``name`` (an MTP site needs ``cfg``)."""
    prefix = f"decoder.layers.{layer}." if cfg is None else site_prefix(cfg, layer)
    return f"{prefix}{HC}.{name}"


def head_key(name: str, depth: int | None = None) -> str:
    """``hc_head_fn`` -> ``decoder.hc_head_fn`` (depth None) or ``mtp.layers.d.hc_head_fn``."""
    return HEAD_PARENT + name if depth is None else f"mtp.layers.{depth}.{name}"


def mhc_param_id(key: str, cfg=None) -> tuple[str, int | None, str]:
    """A model key of an mHC parameter -> ("hc", site, name) or ("head", depth or None, name)
    (an MTP layer's key needs ``cfg`` for its site number)."""
    if key.startswith(HEAD_PREFIX):
        return ("head", None, key[len(HEAD_PARENT):])
    found = mtp_depth_key(key)
    if found and found[1].startswith(HEAD_NAME_PREFIX):
        return ("head", found[0], found[1])
    m = SITE_RE.match(key)
    if not m or not m.group(2).startswith(HC + "."):
        raise ValueError(f"{key!r} is not an mHC parameter key")
    if LAYER_RE.match(key):
        site = int(LAYER_RE.match(key).group(1))
    else:
        site = site_of(cfg, key)[0] if cfg is not None else None
        if site is None:
            raise ValueError(f"{key!r} is not an mHC parameter of the configured MTP layers")
    return ("hc", site, m.group(2)[len(HC) + 1:])


def layout_of(keys: Iterable[str], prefix: str = "") -> bool | None:
    """Layout of a set of keys (model keys or ``optimizer.state.*`` ones, under ``prefix``):
    True (mHC-on: wrapped), False (mHC-off: plain), None (no layer keys). A mixture is an
    error: no checkpoint of either layout contains both."""
    on = off = False
    plain: list[str] = []
    for key in keys:
        if not key.startswith(prefix):
            continue
        rel = split_opt(key[len(prefix):])[1]
        found = mtp_depth_key(rel)
        if is_head_key(rel) or (found and found[1] in MTP_PROJ_ON):
            on = True
            continue
        if found and found[1] in MTP_PROJ_OFF:
            off = True
            plain.append(key)
            continue
        m = SITE_RE.match(rel)
        if m:
            if m.group(2).startswith((INNER + ".", HC + ".")):
                on = True
            else:
                off = True
                plain.append(key)
    if on and off:
        bad = sorted(plain)[:3]
        raise MixedLayoutError(f"mixed layout: the state mixes the mHC-on (inner_layer/"
                               f"hyper_connection) and mHC-off (plain decoder.layers.N.X) "
                               f"layouts; plain keys e.g. {bad}", key=bad[0])
    return True if on else (False if off else None)


def split_table(cfg, symbol: str) -> Splits:
    """Megatron's factory splits for one layer symbol: base suffix -> ((part, rows), ...)."""
    return LAYER_SPECS[symbol].splits(cfg)


def layer_splits(cfg, key: str) -> tuple[str, tuple[tuple[str, int], ...]] | None:
    """(layer-relative canonical base, parts) when the model ``key`` (either layout) is
    stored by Megatron as a factory split; None otherwise."""
    found = site_of(cfg, unwrap(key))
    symbol = layer_symbol(cfg, found[0]) if found else None
    if symbol is None:
        return None
    rel = canonical(symbol, found[2])
    splits = split_table(cfg, symbol).get(rel)
    return (rel, splits) if splits else None


def disk_views(cfg, key: str, tensor: Tensor) -> dict[str, Tensor]:
    """One model tensor as the ``torch_dist`` item(s) Megatron stores for it: itself, or the
    row views of its factory split (``...in_proj.weight.z`` ...). Views, never copies, so a
    load through them writes straight into the model's storage."""
    found = layer_splits(cfg, key)
    if found is None:
        return {key: tensor}
    splits = found[1]
    total = sum(rows for _, rows in splits)
    if tensor.shape[0] != total:
        raise ValueError(f"{key}: {tensor.shape[0]} rows, the factory split needs {total}")
    out, start = {}, 0
    for part, rows in splits:
        out[f"{key}.{part}"] = tensor.narrow(0, start, rows)
        start += rows
    return out


def merge_splits(keys: Iterable[str], cfg) -> dict[str, list[str]]:
    """Stored keys -> model keys: every complete factory split ``K.part`` becomes its base
    ``K`` (value: the stored parts in split order); any other key maps to itself. An
    incomplete split stays as its parts (the planner reports what is missing)."""
    keys = list(keys)
    present = set(keys)
    out: dict[str, list[str]] = {}
    for k in keys:
        base, _, part = k.rpartition(".")
        found = layer_splits(cfg, base) if base else None
        if found is not None and part in dict(found[1]):
            parts = [f"{base}.{p}" for p, _ in found[1]]
            if all(p in present for p in parts):
                out[base] = parts
                continue
        out[k] = [k]
    return out


def stack_table(cfg, symbol: str) -> Stacks:
    """Stored keys of a symbol's layer that stand for several model tensors
    (``LayerSpec.stacks``)."""
    return LAYER_SPECS[symbol].stacks(cfg)


def stacked(cfg, key: str) -> tuple[str, ...] | None:
    """The model keys (same layout) a stored stacked tensor stands for, in stack order (row i
    is the i-th); None when ``key`` is not one."""
    parts = _split_layer_key(cfg, key)
    symbol = layer_symbol(cfg, parts[0]) if parts else None
    if symbol is None:
        return None
    _, prefix, inner, rel = parts
    found = stack_table(cfg, symbol).get(rel)
    if found is None:
        return None
    template, count = found
    return tuple(f"{prefix}{inner}{template.format(i)}" for i in range(count))


def tp_parts(cfg, key: str) -> tuple[tuple[str, int], ...] | None:
    """The row blocks a dim-0 tensor-parallel shard of the stored ``key`` (either layout) holds
    a slice of each (``LayerSpec.tp_parts``), or None when a shard is one contiguous block."""
    parts = _split_layer_key(cfg, key)
    symbol = layer_symbol(cfg, parts[0]) if parts else None
    if symbol is None:
        return None
    return LAYER_SPECS[symbol].tp_parts(cfg).get(canonical(symbol, parts[3]))


def canonical_key(cfg, key: str) -> str:
    """A full layer key (either layout) with its layer-relative part in our spelling
    (``decoder.layers.0.mixer.conv1d_weight`` -> ``...mixer.conv1d.weight``)."""
    parts = _split_layer_key(cfg, key)
    if parts is None:
        return key
    site, prefix, inner, rel = parts
    return f"{prefix}{inner}{canonical(layer_symbol(cfg, site), rel)}"


@dataclass(frozen=True)
class Source:
    """Where a model tensor is stored: one key, the rows of a factory split (``parts``, in
    split order, concatenated along dim 0), or row ``index`` of a stacked tensor."""

    parts: tuple[str, ...]
    index: int | None = None


def model_sources(keys: Iterable[str], cfg) -> dict[str, Source]:
    """Stored (model-space) keys -> our model keys (same layout) and where each is stored.
    Complete factory splits merge, stacks expand, aliases become our names. Two stored keys
    for one model key are an error."""
    out: dict[str, Source] = {}
    for base, parts in merge_splits(keys, cfg).items():
        names = stacked(cfg, base)
        found = ({n: Source((base,), i) for i, n in enumerate(names)} if names is not None
                 else {canonical_key(cfg, base): Source(tuple(parts))})
        for name, src in found.items():
            if name in out:
                raise InvalidInputError(f"stored twice: {out[name].parts[0]!r} and "
                                        f"{src.parts[0]!r} are both {name!r}", key=src.parts[0])
            out[name] = src
    return out


def is_extra_state(key: str) -> bool:
    """``<module>._extra_state`` with or without Megatron's ``/shard_*`` suffix."""
    return SHARD_RE.sub(r"\1", key).endswith("." + EXTRA_STATE)


def extra_state_module(key: str) -> str:
    """``a.b._extra_state/shard_0_1`` -> ``a.b``."""
    return SHARD_RE.sub(r"\1", key)[: -len(EXTRA_STATE) - 1]


def mtp_proj_part(name: str) -> tuple[str, str] | None:
    """An MTP depth-relative name of its input projection, split into the projection's weight
    name (``MTP_PROJ_OFF``/``MTP_PROJ_ON``) and the stored tail: ``eh_proj.weight`` ->
    ("eh_proj.weight", ""); its linear's byte object ``e_proj._extra_state/shard_0_1`` ->
    ("e_proj.weight", "._extra_state/shard_0_1"). None for any other name."""
    if name in MTP_PROJ_OFF + MTP_PROJ_ON:
        return name, ""
    if is_extra_state(name):
        module = extra_state_module(name)
        if module + ".weight" in MTP_PROJ_OFF + MTP_PROJ_ON:
            return module + ".weight", name[len(module):]
    return None


def mtp_proj_in_module_order(order: list[str]) -> list[str]:
    """Each MTP depth's input-projection keys (weights and their linears' ``_extra_state``) as
    one block where the first of them stands, in module order (a linear's weight, then its
    ``_extra_state``), as Megatron's module state dict holds them (e.g. ``eh_proj.weight``,
    ``eh_proj._extra_state``): a toggle makes the new weights and carries the extra states,
    which a placement by parameter order would split apart (the legacy adapter's rank
    files; a round trip would reorder them)."""
    names = MTP_PROJ_OFF + MTP_PROJ_ON
    groups: dict[int, list[str]] = {}
    for k in order:
        found = mtp_depth_key(k)
        part = mtp_proj_part(found[1]) if found else None
        if part is not None:
            groups.setdefault(found[0], []).append(k)

    def rank(k: str) -> tuple[int, bool]:
        weight, tail = mtp_proj_part(mtp_depth_key(k)[1])
        return names.index(weight), bool(tail)

    member = {k: d for d, ks in groups.items() for k in ks}
    out: list[str] = []
    for k in order:
        if k not in member:
            out.append(k)
        elif k == groups[member[k]][0]:
            out += sorted(groups[member[k]], key=rank)
    return out


def is_non_layer_module(module: str) -> bool:
    """A module of Megatron's model outside the layers (``output_layer`` even when tied: the
    module, and its ``_extra_state``, exist without its weight)."""
    return any(k.startswith(module + ".") for k in NON_LAYER_KEYS)
