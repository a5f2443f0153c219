"""Dispatch policies: which instance gets a new request."""

from __future__ import annotations

from collections.abc import Sequence

from llumnix.core.llumlet import InstanceLoad
from llumnix.core.request import Request
from llumnix.policies.registry import Registry


class DispatchPolicy:
    name = "base"

    def choose(self, request: Request, loads: Sequence[InstanceLoad]) -> int:
        raise NotImplementedError  # abstract: every registered subclass implements it

    def on_instance_added(self, instance_id: int) -> None:  # noqa: B027 - optional hook
        pass


DISPATCH_POLICIES: Registry[DispatchPolicy] = Registry("dispatch")


def _eligible(loads: Sequence[InstanceLoad]) -> list[InstanceLoad]:
    live = [ld for ld in loads if not ld.draining]
    if not live:
        raise RuntimeError("no instance accepts requests (all are draining or none is ready)")
    return live


@DISPATCH_POLICIES.register("round-robin")
class RoundRobin(DispatchPolicy):
    """The paper's baseline: the instance with the fewest requests dispatched to it so far (ties: lowest id)."""

    def __init__(self) -> None:
        self.dispatched: dict[int, int] = {}

    def on_instance_added(self, instance_id: int) -> None:
        # A new instance starts level with the least-loaded one, not at zero (it would otherwise take every request).
        self.dispatched[instance_id] = min(self.dispatched.values(), default=0)

    def choose(self, request: Request, loads: Sequence[InstanceLoad]) -> int:
        live = _eligible(loads)
        best = min(live, key=lambda ld: (self.dispatched.get(ld.instance_id, 0), ld.instance_id))
        self.dispatched[best.instance_id] = self.dispatched.get(best.instance_id, 0) + 1
        return best.instance_id


@DISPATCH_POLICIES.register("freeness")
class HighestFreeness(DispatchPolicy):
    """INFaaS++ and Llumnix: the instance with the highest dispatch freeness for the request's priority (ties: the
    highest instance id, as the artifact's sort leaves them, osdi24ae ``vllm/core/request_scheduler.py:144-152,
    578-602``).

    A normal request sees the high-priority reserve on the instances that hold high priority (it avoids them); a
    high-priority request sees it on the instances that hold none (it joins the ones that do), unless an instance
    is empty (+inf). With priorities off there is no reserve and the two are the same.
    """

    def choose(self, request: Request, loads: Sequence[InstanceLoad]) -> int:
        live = _eligible(loads)
        if request.is_high:
            best = max(live, key=lambda ld: (ld.dispatch_freeness_high, ld.instance_id))
        else:
            best = max(live, key=lambda ld: (ld.dispatch_freeness, ld.instance_id))
        return best.instance_id


def make_dispatch_policy(name: str) -> DispatchPolicy:
    return DISPATCH_POLICIES.get(name)()
