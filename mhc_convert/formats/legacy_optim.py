"""Index-based optimizer state remapping for Megatron legacy ``.pt`` checkpoints.

A plain torch optimizer numbers its parameters; when a conversion renames, adds or drops
parameters the indices must follow. ``remap_index_optimizer`` does that as a pure function:
carried state keeps its tensors (the same objects), new parameters get zero moments, and any
state that would be lost must be dropped explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mhc_convert.errors import InvalidInputError

# --------------------------------------------------------------------------- optimizer remap

_MOMENTS = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"})
_ADVICE = "re-run with --drop-optimizer to discard the optimizer state"
_HALF = (torch.float16, torch.bfloat16)


def remap_index_optimizer(opt_state: dict, old_order: list[str], new_order: list[str],
                          new_params: dict[str, torch.Tensor], *,
                          renames: dict[str, str] | None = None, dropped: Any = (),
                          new_param_groups: dict[str, int | str] | None = None,
                          path: str | Path | None = None) -> dict:
    """Remap an index-keyed optimizer state dict to a new parameter list. Pure: the input is
    not modified; carried state tensors are the *same objects* in the output.

    ``opt_state``: a torch ``Optimizer.state_dict()`` (``{'state', 'param_groups'}``), or
    Megatron's mixed-precision wrapper ``{'optimizer': <that>, 'fp32_from_fp16_params':
    [[fp32 main param, ...] per group], 'grad_scaler'?}``.
    ``old_order[i]``: name of optimizer index ``i`` (torch numbers params group by group, so for
    a one-group optimizer this is ``model.parameters()`` order).
    ``new_order``: the new model's parameter names in ``parameters()`` order. Output indices are
    numbered the way torch would: group by group, members in ``new_order`` order.
    ``renames``: old name -> new name; an old name present in ``new_order`` carries unchanged.
    ``dropped``: old names allowed to disappear; any other vanishing name is an error.
    ``new_param_groups``: added name -> group index, or the name of a neighbour whose group it
    joins (default group 0). ``new_params``: values of the added params (shape, dtype, fp32
    main copy); entries for carried names are used to check shapes.
    Added params get zero moments and a copy of their group neighbour's ``step``. A group left
    empty is removed (Megatron builds no empty groups)."""
    if isinstance(opt_state, dict) and "optimizer" in opt_state:
        return _remap_wrapped(opt_state, old_order, new_order, new_params, renames or {},
                              set(dropped), new_param_groups or {}, path)
    plan = _plan(opt_state, old_order, new_order, new_params, renames or {}, set(dropped),
                 new_param_groups or {}, path)
    return _build_plain(opt_state, plan, new_params, path)


def _refuse(msg: str, path: Any, key: str | None = None) -> InvalidInputError:
    return InvalidInputError(msg, path=path, key=key)


def _plan(sd: Any, old_order: list[str], new_order: list[str], new_params: dict, renames: dict,
          dropped: set, group_spec: dict, path: Any) -> list[tuple[int, list[tuple[str, Any]]]]:
    """Validate and return ``[(old_group_index, [(new_name, old_index | None), ...]), ...]``."""
    if not isinstance(sd, dict) or set(sd) != {"state", "param_groups"} or not (
            isinstance(sd["param_groups"], list) and isinstance(sd["state"], dict)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    for g in sd["param_groups"])):
        raise _refuse(f"optimizer state has an unrecognised structure; {_ADVICE}", path,
                      "optimizer")
    group_of = {i: g for g, grp in enumerate(sd["param_groups"]) for i in grp["params"]}
    flat = [i for grp in sd["param_groups"] for i in grp["params"]]
    if len(flat) != len(group_of) or set(flat) != set(range(len(old_order))):
        raise _refuse(f"optimizer indexes {len(flat)} params but {len(old_order)} names were "
                      f"given (or indexes are not 0..N-1); {_ADVICE}", path, "optimizer")
    stray = [k for k in sd["state"] if k not in group_of]
    if stray:
        raise _refuse(f"state entries {stray[:5]} belong to no param group; {_ADVICE}", path,
                      "optimizer.state")
    new_pos = {n: i for i, n in enumerate(new_order)}
    if len(new_pos) != len(new_order) or len(set(old_order)) != len(old_order):
        raise _refuse("duplicate parameter names in old_order/new_order", path)
    for o, n in renames.items():
        if o not in old_order or n not in new_pos:
            raise _refuse(f"rename {o!r} -> {n!r}: source not an old param or target not a new "
                          f"param", path, o)
    carried: dict[str, int] = {}  # new name -> old index
    for i, o in enumerate(old_order):
        t = renames.get(o, o)
        if t in new_pos:
            if o in dropped:
                raise _refuse("listed as dropped but it is carried to the new model", path, o)
            if t in carried:
                raise _refuse(f"two old params map to {t!r}", path, o)
            carried[t] = i
        elif o not in dropped:
            raise _refuse("optimizer state would be dropped silently (not in the new model, "
                          "not renamed, not declared dropped)", path, o)
    unknown = sorted(dropped - set(old_order))
    if unknown:
        raise _refuse("declared dropped but not an old param", path, unknown[0])
    groups: dict[str, int] = {}
    for n in new_order:
        if n in carried:
            groups[n] = group_of[carried[n]]
    for n in new_order:
        if n in carried:
            continue
        if n not in new_params:
            raise _refuse("new param has no value in new_params", path, n)
        spec = group_spec.get(n, 0)
        if isinstance(spec, str):
            nb = renames.get(spec, spec) if spec in old_order else spec
            if nb not in groups:
                raise _refuse(f"neighbour {spec!r} is not a carried param", path, n)
            spec = groups[nb]
        if not 0 <= spec < len(sd["param_groups"]):
            raise _refuse(f"param group {spec} does not exist", path, n)
        groups[n] = spec
    plan = []
    for g, grp in enumerate(sd["param_groups"]):
        members = [(n, carried.get(n)) for n in new_order if groups[n] == g]
        if members or not grp["params"]:
            plan.append((g, members))
    return plan


def _new_state(template: dict, shape: torch.Size, name: str, path: Any) -> dict:
    """Fresh per-param state: zero moments of the new shape, the neighbour's step."""
    out = {}
    for k, v in template.items():
        if k == "step":
            out[k] = v.clone() if torch.is_tensor(v) else v
        elif k in _MOMENTS and torch.is_tensor(v):
            out[k] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        else:
            raise _refuse(f"unknown per-param optimizer state {k!r}; cannot initialise it for "
                          f"a new param; {_ADVICE}", path, name)
    return out


def _build_plain(sd: dict, plan: list, new_params: dict, path: Any) -> dict:
    state, groups, idx = {}, [], 0
    any_state = next(iter(sd["state"].values()), None)
    for g, members in plan:
        first = next((sd["state"][o] for _, o in members if o in sd["state"]), any_state)
        params = []
        for name, old in members:
            if old is not None:
                if old in sd["state"]:
                    st = sd["state"][old]
                    ref = new_params.get(name)
                    if ref is not None and "exp_avg" in st and st["exp_avg"].shape != ref.shape:
                        raise _refuse(f"state shape {tuple(st['exp_avg'].shape)} != param shape "
                                      f"{tuple(ref.shape)}; is old_order right?", path, name)
                    state[idx] = dict(st)  # new dict, same tensor objects
            elif first is not None:
                state[idx] = _new_state(first, new_params[name].shape, name, path)
            params.append(idx)
            idx += 1
        groups.append({**sd["param_groups"][g], "params": params})
    return {"state": state, "param_groups": groups}


def _remap_wrapped(opt: dict, old_order, new_order, new_params, renames, dropped, group_spec,
                   path) -> dict:
    """Megatron ``Float16OptimizerWithFloat16Params.state_dict()``: the torch state under
    ``optimizer`` plus fp32 main copies per group, aligned with each group's ``params``."""
    extra = set(opt) - {"optimizer", "grad_scaler", "fp32_from_fp16_params"}
    if extra:  # e.g. distributed-optimizer or chained forms: not index-keyed torch state
        raise _refuse(f"optimizer wrapper has unrecognised keys {sorted(extra)}; {_ADVICE}",
                      path, "optimizer")
    inner = opt["optimizer"]
    plan = _plan(inner, old_order, new_order, new_params, renames, dropped, group_spec, path)
    out = dict(opt)
    out["optimizer"] = _build_plain(inner, plan, new_params, path)
    fp32 = opt.get("fp32_from_fp16_params")
    if fp32 is None:
        return out
    n_groups = len(inner["param_groups"])
    if not (isinstance(fp32, list) and len(fp32) == n_groups
            and all(isinstance(x, list) for x in fp32)):
        raise _refuse(f"fp32_from_fp16_params is not one list per param group; {_ADVICE}",
                      path, "optimizer.fp32_from_fp16_params")
    main_of: dict[int, torch.Tensor] = {}
    half_group: dict[int, bool | None] = {}
    for g, (grp, mains) in enumerate(zip(inner["param_groups"], fp32)):
        if len(mains) == len(grp["params"]) and mains:
            main_of.update(zip(grp["params"], mains))
            half_group[g] = True
        elif not mains:
            half_group[g] = False if grp["params"] else None
        else:  # a mixed fp16/fp32 group: which params own the copies is not recorded
            raise _refuse(f"param group {g} mixes fp16/bf16 and fp32 params; {_ADVICE}", path,
                          "optimizer.fp32_from_fp16_params")
    new_fp32 = []
    for g, members in plan:
        mains, half = [], half_group[g]
        for name, old in members:
            if old is not None:
                if half:
                    mains.append(main_of[old])
                continue
            v = new_params[name]
            is_half = v.dtype in _HALF
            if half is None:
                half = half_group[g] = is_half
            if is_half != half:
                raise _refuse(f"new param dtype {v.dtype} does not match its param group's "
                              f"precision; {_ADVICE}", path, name)
            if half:
                mains.append(v.detach().to(torch.float32, copy=True))
        new_fp32.append(mains if half else [])
    out["fp32_from_fp16_params"] = new_fp32
    return out
