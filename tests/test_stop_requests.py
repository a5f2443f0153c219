"""Requests that end before ``max_tokens`` on the serving runtime: at a stop token (a real model's end of sequence) or
because the client is done with them (a stop string: ``ClusterManager.finish_early``), also while they migrate.

The runtime's own classes (``ClusterManager``, ``InstanceActor``, the migration driver) with profile-backed instances
in this process on a virtual clock (``llumnix.runtime.lockstep``): deterministic and fast. A profile executor's token
at output position ``p`` of engine request ``r`` is ``synthetic_token(r, prompt + p)``.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from llumnix.engine.executor import synthetic_token
from llumnix.runtime.actors import LocalLauncher
from llumnix.runtime.cluster import ClusterManager
from llumnix.runtime.lockstep import run_virtual
from llumnix.runtime.serve_config import build_serve_config

PROMPT = 200  # 13 blocks of 16: a migration copies 12 while the request decodes, then stops it for the last ones


@pytest.fixture(autouse=True)
def quiet(caplog):
    caplog.set_level(logging.WARNING)


async def _cluster() -> ClusterManager:
    loop = asyncio.get_running_loop()
    config = build_serve_config({}, {"backend": "profile", "instances": 2, "migration": False, "poll_timeout_s": 3600})
    manager = ClusterManager(config, LocalLauncher(clock=loop.time, idle_wait_s=None), clock=loop.time)
    await manager.start()
    return manager


async def _until(predicate, step_s: float = 0.001, limit_s: float = 600.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not await predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(step_s)


async def _idle(manager: ClusterManager) -> None:
    """Wait until no instance holds a request; then their blocks are all free."""
    checks = {}

    async def idle() -> bool:
        for iid, inst in manager.instances.items():
            checks[iid] = await inst.actor.check.remote()
        return all(not (c["running"] or c["waiting"] or c["frozen"]) for c in checks.values())

    await _until(idle)
    assert all(c["free_blocks"] == c["num_blocks"] for c in checks.values()), checks


def test_a_stop_token_ends_the_request_and_frees_it():
    async def run():
        manager = await _cluster()
        stop = synthetic_token(0, PROMPT + 3)  # engine request 0's 4th token
        cr = await manager.submit([1] * PROMPT, 40, stop_token_ids=frozenset({stop}))
        plain = await manager.submit([1] * PROMPT, 6)  # no stop tokens: runs to max_tokens
        await _until(lambda: _done(cr, plain))
        await _idle(manager)
        await manager.stop()
        return cr, plain

    cr, plain = run_virtual(run())
    assert cr.tokens[-1] == synthetic_token(0, PROMPT + 3) and len(cr.tokens) == 4 and cr.stopped
    assert len(plain.tokens) == 6 and not plain.stopped and cr.error is None is plain.error


def test_finish_early_stops_the_engine_request():
    async def run():
        manager = await _cluster()
        cr = await manager.submit([1] * PROMPT, 500)
        await _until(lambda: _has(cr, 5))
        manager.finish_early(cr, 3)
        assert cr.done and cr.tokens == [synthetic_token(0, PROMPT + p) for p in range(3)]
        await _idle(manager)
        assert len(cr.tokens) == 3 and asyncio.get_running_loop().time() < 1.0  # long before its 500 tokens
        await _until(lambda: _finished_on_instances(manager, 1))  # the instance's report counts it
        await manager.stop()
        return cr

    cr = run_virtual(run())
    assert cr.stopped and cr.cut_short and len(cr.tokens) == 3


def test_a_request_finished_early_while_frozen_in_a_migration_is_stopped_on_its_destination():
    """The source cannot abort a request in its stop-and-copy (frozen: it belongs to the migration); once the migration
    commits the destination holds it, and the manager stops it there."""

    async def run():
        manager = await _cluster()
        cr = await manager.submit([1] * PROMPT, 500)
        await _until(lambda: _has(cr, 2))
        src = manager.instances[cr.owner]
        started = await manager.migrate_request(cr.request_id)
        assert started["started"], started

        async def frozen() -> bool:
            return bool((await src.actor.check.remote())["frozen"])

        await _until(frozen, step_s=0.0005)
        manager.finish_early(cr, len(cr.tokens))
        cut_s = asyncio.get_running_loop().time()
        await _until(lambda: _migrated(manager))
        await _idle(manager)  # the destination too: the manager stopped it there
        idle_s = asyncio.get_running_loop().time()
        await manager.stop()
        return cr, started, manager.migration_log, idle_s - cut_s

    cr, started, log, stopped_after_s = run_virtual(run())
    (record,) = [m for _, m in log]
    assert record.committed and record.dst == started["dst"] and cr.cut_short and len(cr.tokens) < 50
    assert stopped_after_s < 1.0  # not after the ~450 decode steps (~10 s) its max_tokens would take


async def _done(*crs) -> bool:
    return all(cr.done for cr in crs)


async def _has(cr, n: int) -> bool:
    return len(cr.tokens) >= n


async def _finished_on_instances(manager: ClusterManager, n: int) -> bool:
    return sum(i.stats.finished for i in manager.instances.values() if i.stats is not None) == n


async def _migrated(manager: ClusterManager) -> bool:
    return bool(manager.migration_log)
