import math

import pytest

from llumnix.core.llumlet import InstanceLoad
from llumnix.core.request import HIGH, Request
from llumnix.policies import make_dispatch_policy, make_pairing_policy
from llumnix.policies.scaling import Scaler, ScalingConfig
from llumnix.policies.system import GlobalScheduler, SystemConfig


def load(iid, freeness, *, running=4, waiting=0, high=0, draining=False, out=True, inn=True, fh=None):
    return InstanceLoad(iid, running, waiting, 100, 792, high, -math.inf if draining else freeness,
                        fh if fh is not None else freeness, draining, 0, 0, out, inn and not draining)


def req(i=0, priority=0):
    return Request(i, 0.0, 10, 10, priority=priority)


def test_round_robin_fewest_dispatched_so_far():
    rr = make_dispatch_policy("round-robin")
    loads = [load(0, 1), load(1, 100), load(2, 50)]
    assert [rr.choose(req(i), loads) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    rr.on_instance_added(3)  # joins level with the others, not at zero
    picks = [rr.choose(req(i), loads + [load(3, 5)]) for i in range(4)]
    assert sorted(picks) == [0, 1, 2, 3]


def test_freeness_dispatch_highest_and_skips_draining():
    d = make_dispatch_policy("freeness")
    assert d.choose(req(), [load(0, 5), load(1, 50), load(2, 20)]) == 1
    assert d.choose(req(), [load(0, 5), load(1, 50, draining=True), load(2, 20)]) == 2
    with pytest.raises(RuntimeError, match="no instance"):
        d.choose(req(), [load(0, 5, draining=True)])


def test_priority_aware_dispatch():
    d = make_dispatch_policy("freeness")
    loads = [load(0, 5, high=1, fh=300), load(1, 50), load(2, 40)]
    assert d.choose(req(priority=HIGH), loads) == 0  # prefers an instance already serving high priority
    assert d.choose(req(), loads) == 1  # normal avoids it
    loads = [load(0, -1, high=1, fh=300), load(1, 50, fh=50)]
    assert d.choose(req(priority=HIGH), loads) == 1  # unless it has no room under its high-priority cap


def test_pairing_lowest_source_with_highest_destination():
    p = make_pairing_policy("freeness", threshold=3)
    loads = [load(0, -5), load(1, 100), load(2, 1), load(3, 40), load(4, 3), load(5, 10, inn=False)]
    assert p.pairs(loads) == [(0, 1), (2, 3)]
    assert make_pairing_policy("none", threshold=3).pairs(loads) == []
    drain = [load(0, 0, draining=True), load(1, 10)]
    assert p.pairs(drain) == [(0, 1)]
    assert p.pairs([load(0, -5, out=False), load(1, 100)]) == []


def test_scaler_band():
    s = Scaler(ScalingConfig(scale_up=10, scale_down=60, min_instances=1, max_instances=3))
    assert s.decide([load(0, 5), load(1, 8)], 0).start == 1
    assert s.decide([load(0, 5), load(1, 8)], 1).start == 0  # one start at a time
    assert s.decide([load(0, 5), load(1, 8), load(2, 1)], 0).start == 0  # at max
    d = s.decide([load(0, 100, running=3), load(1, 80, running=1)], 0)
    assert d.drain == 1  # fewest running
    assert s.decide([load(0, 100)], 0).drain is None  # at min
    assert s.decide([load(0, 30), load(1, 30)], 0) == s.decide([], 0).__class__()
    with pytest.raises(ValueError, match="scale-up"):
        ScalingConfig(scale_up=70, scale_down=60)


def test_systems_compose_policies():
    assert not GlobalScheduler(SystemConfig(policy="infaas++")).migrates
    assert GlobalScheduler(SystemConfig(policy="llumnix")).migrates
    assert not GlobalScheduler(SystemConfig(policy="llumnix", migration=False)).migrates
    with pytest.raises(ValueError, match="--policy"):
        SystemConfig(policy="nope")
