"""The mHC toggle core, owned by the model package (DESIGN.md §3-§5): the key codec
(``codec``), the keys and shapes a config implies (``shapes``), the pure planner (``plan``), the
values of new parameters (``values``) and the disable verdict (``verdict``).

Three routes apply the same ``Plan``: ``mhc_convert.engine`` to a lazy checkpoint view,
``mhc_model.shim`` to a state dict in ``load_state_dict``, and ``mhc_model.checkpoint.load_dist``
to a DCP load; so "both toggle routes give identical state" holds by construction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mhc_model.toggle.plan import Add, Drop, Plan, Rename, make_plan, plan_for_model

__all__ = ["Add", "Drop", "Plan", "Rename", "make_plan", "plan_for_model"]


def __getattr__(name: str) -> Any:
    """The planner is imported on first use: ``codec`` alone (key strings) needs no torch."""
    if name in __all__:
        from mhc_model.toggle import plan

        return getattr(plan, name)
    raise AttributeError(f"module 'mhc_model.toggle' has no attribute {name!r}")
