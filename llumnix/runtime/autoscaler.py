"""Auto-scaling of the serving cluster: the simulator's ``Scaler`` decides, this module carries its decisions out on
instance actors and counts the cost.

Every ``scale_interval_s`` the scaler decides on the instances' effective loads and the number still starting. A
started instance is a new actor; it takes requests once its engine is up and it has reported a load (plus
``startup_delay_s`` if set). A drained instance's llumlet reports freeness -inf, so dispatch skips it and the pairing
policy migrates its running requests away; its queued requests come back (``InstanceActor.drain``) and are dispatched
again. Once it holds nothing and no migration is in flight (``InstanceActor.retire``) its actor is stopped and it
leaves dispatch and the metrics. Every instance's launch and stop times give the cost: instance-seconds, and their
average over a window (``status``, ``/admin/scaling``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llumnix.runtime.cluster import ClusterManager, InstanceHandle

log = logging.getLogger(__name__)


class AutoScaler:
    def __init__(self, manager: ClusterManager) -> None:
        self.manager = manager

    async def run(self) -> None:
        m = self.manager
        scaler = m.gs.scaler
        while m.running:
            await asyncio.sleep(scaler.config.check_interval_s)
            try:
                decision = m.gs.scale(m.loads(), len(m.starting), m.clock() - m.started_s)  # the simulator's clock starts at 0
                for _ in range(decision.start):
                    m.spawn(self.start_instance())
                if decision.cancel_drain is not None:
                    await self.undrain(decision.cancel_drain)
                if decision.drain is not None:
                    await self.drain(decision.drain, requeue=scaler.config.requeue_on_drain)
            except Exception:
                log.exception("auto-scaling round failed")

    async def start_instance(self, placement_timeout_s: float | None = None) -> dict[str, Any]:
        """Launch one more instance actor; it takes requests once its engine is up and it has reported a load. With
        ``placement_timeout_s``, an actor Ray has not given its CPUs / GPUs within that many seconds is killed (not
        left waiting for them) and the answer says so (``placed``: False)."""
        from llumnix.runtime.cluster import InstanceHandle

        m = self.manager
        iid = m.next_instance_id()
        actor = m.launch_actor(iid)
        m.starting[iid] = actor
        log.info("starting instance %d", iid)
        try:
            if placement_timeout_s is not None and not await self._placed(actor, placement_timeout_s):
                m.starting.pop(iid, None)
                m.kill_actor(actor)
                m.mark_stopped(iid)
                m.counters["instance_start_failures"] += 1
                m.event(iid, "start_failed")
                reason = self._unplaced_reason(placement_timeout_s)
                log.warning("instance %d did not start: %s", iid, reason)
                return {"started": False, "placed": False, "instance_id": iid, "reason": reason}
            info = await asyncio.wait_for(actor.start.remote(), m.config.startup_timeout_s)
            if m.config.startup_delay_s > 0:
                await asyncio.sleep(m.config.startup_delay_s)
            report = await actor.poll.remote(0.0)
        except BaseException as e:
            m.starting.pop(iid, None)
            m.kill_actor(actor)
            m.mark_stopped(iid)
            if isinstance(e, asyncio.CancelledError):
                raise
            m.counters["instance_start_failures"] += 1
            m.event(iid, "start_failed")
            log.warning("instance %d did not start: %r", iid, e)
            return {"started": False, "instance_id": iid, "reason": repr(e)}
        m.starting.pop(iid, None)
        if not m.running:  # the cluster is shutting down
            m.kill_actor(actor)
            m.mark_stopped(iid)
            return {"started": False, "instance_id": iid, "reason": "shutting down"}
        inst = InstanceHandle(iid, actor, info)
        m.add_instance(inst, report)
        m.counters["instances_started"] += 1
        m.spawn(m._poll_loop(inst))
        log.info("instance %d ready (%.1f s after launch)", iid, m.clock() - m.spans[iid].launch_s)
        return {"started": True, "instance_id": iid}

    async def _placed(self, actor: Any, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until Ray has given ``actor`` its resources."""
        launcher = self.manager.launcher
        deadline = time.monotonic() + timeout_s
        while not launcher.placed(actor):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    def _unplaced_reason(self, timeout_s: float) -> str:
        cfg = self.manager.config
        need = {"CPU": cfg.num_cpus_per_instance, "GPU": cfg.gpus_per_instance}
        try:
            free = self.manager.launcher.available()
        except Exception:
            free = {}
        asked = ", ".join(f"{v:g} {k} (--num-{k.lower()}s-per-instance)" for k, v in need.items() if v > 0)
        have = ", ".join(f"{free.get(k, 0.0):g} {k}" for k, v in need.items() if v > 0)
        return (f"Ray gave the new instance no resources within {timeout_s:g} s (--placement-timeout): it asks for "
                f"{asked or 'none'} and the cluster has {have or 'them'} free; free some (drain an instance) or add "
                "nodes")

    async def drain(self, instance_id: int, requeue: bool = True) -> dict[str, Any]:
        """Drain an instance (the scaler's scale-down, or an operator): it takes no new request, its running ones
        migrate away (or finish there without migration), its queued ones are dispatched again (``requeue``) or
        served there; then it stops."""
        m = self.manager
        inst = m.instances.get(instance_id)
        if inst is None or not inst.alive:
            raise KeyError(f"no live instance {instance_id}")
        if inst.draining:
            return {"draining": True, "instance_id": instance_id, "requeued": 0, "reason": "already draining"}
        others = [i for i in m.live_instances() if i is not inst and not i.draining and i.load is not None]
        if not others:
            return {"draining": False, "instance_id": instance_id, "reason": "it is the last instance taking requests"}
        inst.draining = True
        m.counters["instances_drained"] += 1
        m.event(instance_id, "drain")
        log.info("draining instance %d", instance_id)
        try:
            taken = await inst.actor.drain.remote(requeue)
        except m.launcher.actor_died as e:
            m._instance_failed(inst, f"actor died: {e}")
            return {"draining": False, "instance_id": instance_id, "reason": "the instance died"}
        requeued = m.hand_back(taken, f"instance {instance_id} drained")
        return {"draining": True, "instance_id": instance_id, "requeued": requeued}

    async def undrain(self, instance_id: int) -> None:
        """A scale-up came while this instance drained: it serves again."""
        m = self.manager
        inst = m.instances.get(instance_id)
        if inst is None or not inst.alive or not inst.draining:
            return
        inst.draining = False
        m.event(instance_id, "undrain")
        try:
            await inst.actor.undrain.remote()
        except m.launcher.actor_died as e:
            m._instance_failed(inst, f"actor died: {e}")

    async def retire(self, inst: InstanceHandle) -> bool:
        """Stop a drained instance if its actor says it holds nothing (atomically there); True if it stopped."""
        m = self.manager
        try:
            final = await inst.actor.retire.remote()
        except m.launcher.actor_died as e:
            m._instance_failed(inst, f"actor died: {e}")
            return True
        if final is None:
            return False
        m._apply_report(inst, final)
        inst.alive = False
        m.instances.pop(inst.instance_id, None)
        m.retired[inst.instance_id] = inst
        m.mark_stopped(inst.instance_id)
        m.counters["instances_stopped"] += 1
        m.event(inst.instance_id, "stop")
        log.info("instance %d drained and stopped", inst.instance_id)
        for cr in list(m.active.values()):  # none should be left; if one is, it is recomputed, not lost
            if cr.owner == inst.instance_id:
                log.warning("request %s still on retired instance %d: re-dispatching", cr.request_id, inst.instance_id)
                m.schedule_redispatch(cr, f"instance {inst.instance_id} retired")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(inst.actor.stop.remote(), 5.0)
        m.kill_actor(inst.actor)
        return True

    def instance_seconds(self, now: float | None = None) -> float:
        """Seconds of instance time so far: each actor from its launch (start-up included) to its stop."""
        m = self.manager
        now = m.clock() if now is None else now
        return sum(span.seconds(now) for span in m.spans.values())

    def status(self) -> dict[str, Any]:
        """Instance counts and cost: the time-weighted average number of instances over a window is the difference
        of ``instance_seconds`` between two reads over the difference of their ``time_s``."""
        m = self.manager
        now = m.clock()
        live = m.live_instances()
        cfg = m.config
        return {
            "time_s": now,
            "since_s": m.started_s,
            "instance_seconds": self.instance_seconds(now),
            "avg_instances": self.instance_seconds(now) / (now - m.started_s) if now > m.started_s else None,
            "step_rows": m.step_rows,
            "step_instance_sum": m.step_instance_sum,
            "instances": len(m.starting) + len(live),
            "starting": len(m.starting),
            "serving": sum(1 for i in live if not i.draining),
            "draining": sum(1 for i in live if i.draining),
            "autoscale": None if not cfg.autoscale else {
                "scale_up": cfg.scale_up,
                "scale_down": cfg.scale_down,
                "min_instances": cfg.min_instances,
                "max_instances": cfg.max_instances,
                "scale_interval_s": cfg.scale_interval_s,
                "startup_delay_s": cfg.startup_delay_s,
            },
            "events": list(m.scale_events),
        }
