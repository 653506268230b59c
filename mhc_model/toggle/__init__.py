"""The mHC toggle core, owned by the model package (DESIGN.md §3-§5): the key codec
(``codec``), the keys and shapes a config implies (``shapes``), the pure planner (``plan``), the
values of new parameters (``values``) and the disable verdict (``verdict``).

Three routes apply the same ``Plan``: ``mhc_convert.engine`` to a lazy checkpoint view,
``mhc_model.shim`` to a state dict in ``load_state_dict``, and ``mhc_model.checkpoint.load_dist``
to a DCP load; so "both toggle routes give identical state" holds by construction.
"""

from mhc_model.toggle.plan import Add, Drop, Plan, Rename, make_plan, plan_for_model

__all__ = ["Add", "Drop", "Plan", "Rename", "make_plan", "plan_for_model"]
