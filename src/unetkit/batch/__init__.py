"""Many verbs over many models: a plan (:mod:`.plan`), tasks run in engine workers (:mod:`.jobs`), engines
(:mod:`.engines`: local processes, or Ray), the runner with its ledger (:mod:`.runner`) and the summary
(:mod:`.report`). Nothing below this floor imports it, and only :mod:`.engines` imports ray, when asked for."""

from unetkit.batch.plan import Plan, PlanError, Task, load_plan, shortcut_plan
from unetkit.batch.runner import BatchResult, read_ledger, run_batch

__all__ = ["BatchResult", "Plan", "PlanError", "Task", "load_plan", "read_ledger", "run_batch", "shortcut_plan"]
