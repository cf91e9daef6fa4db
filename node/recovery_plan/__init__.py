"""Recovery plans: a named group of VMs failed over together, in boot groups, with hooks,
a timeout per step, a dry run and a report of each step (``docs/recovery-plans.md``).

* :mod:`.plan`: the plan file (TOML) and what it says;
* :mod:`.points`: the group's crash-consistent point at the recovery side;
* :mod:`.hooks`: the plan's hook commands (environment, timeout);
* :mod:`.check`: the dry run (everything checked, nothing changed);
* :mod:`.run`: the run (test, planned, unplanned), step by step, resumable;
* :mod:`.report`: the report (JSON and a table).
"""

from .plan import BootGroup, RecoveryPlan, load_plan
from .report import PlanReport, StepReport
from .run import Mode, run_plan

__all__ = [
    "BootGroup",
    "Mode",
    "PlanReport",
    "RecoveryPlan",
    "StepReport",
    "load_plan",
    "run_plan",
]
