"""What identifies one stage run, wherever it runs: in the flow's process, as a flow run on a work pool, or in every
pod of a multi-host slice. The Prefect task, both flows and the deployment entrypoint take this one object."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from gemstill.errors import GemstillError
from gemstill.pipeline.plan import Plan, make_plan


class StageRequest(BaseModel):
    """Run `stage` of `profile`'s plan (its pipeline, store and overrides); `fresh` recomputes beside the committed
    result; `planned_key` is the key the calling flow planned, which the stage's key here must equal."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    profile: str
    stage: str
    pipeline: str | None = None
    store: str | None = None
    overrides: dict[str, Any] | None = None
    fresh: bool = False
    planned_key: str = ""

    def plan(self, restricted: bool) -> Plan:
        """The plan rebuilt here (so any worker can run it), refusing at once if the stage's key here is not the
        one the flow planned: the code, profile, data or teacher changed since, or differ on this machine."""
        plan = make_plan(self.profile, self.pipeline, self.store, self.overrides, restricted=restricted)
        if self.stage not in plan.stages:
            raise GemstillError(f"no stage named '{self.stage}' in {plan.pipeline_path}; stages: {list(plan.stages)}")
        key = plan.stages[self.stage].key
        if self.planned_key and key != self.planned_key:
            raise GemstillError(
                f"stage {self.stage}: its key here is {key} but the flow planned {self.planned_key}: the code, "
                "profile, data or teacher changed since the run started (or differ on this machine); start the run "
                "again"
            )
        return plan
