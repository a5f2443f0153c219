import math

import pytest

from llumnix.core.llumlet import InstanceLoad, LoadInputs
from llumnix.core.request import HIGH, Request
from llumnix.policies import make_dispatch_policy, make_pairing_policy
from llumnix.policies.pairing import PairingConfig
from llumnix.policies.scaling import Scaler, ScalingConfig
from llumnix.policies.system import PAPER_SYSTEMS, SYSTEMS, GlobalScheduler, SystemConfig


def load(iid, freeness, *, running=4, waiting=0, high=0, draining=False, out=True, inn=True, disp=None,
         disp_high=None, preempted=0, free=100, total=792, queued=0.0, watermark=7):
    f = -math.inf if draining else freeness
    disp = f if disp is None else disp
    x = LoadInputs(free, watermark, queued, 0.0, running, waiting, high, 0, preempted, draining=draining)
    return InstanceLoad(iid, running, waiting, free, total, high, f, disp, disp if disp_high is None else disp_high,
                        draining, 0, 0, out, inn and not draining, preempted, x)


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
    assert d.choose(req(), [load(0, 50, disp=9), load(1, 5, disp=10)]) == 1  # dispatch freeness, not migration's
    assert d.choose(req(), [load(0, math.inf), load(1, math.inf), load(2, 3)]) == 1  # ties: highest id (artifact)
    with pytest.raises(RuntimeError, match="no instance"):
        d.choose(req(), [load(0, 5, draining=True)])


def test_priority_aware_dispatch():
    """High priority ranks by ``dispatch_freeness_high`` (the reserve held back where no high priority runs), normal
    requests by ``dispatch_freeness`` (held back where it does)."""
    d = make_dispatch_policy("freeness")
    loads = [load(0, 5, high=1, disp=-600, disp_high=80), load(1, 50, disp=50, disp_high=-640), load(2, 40)]
    assert d.choose(req(priority=HIGH), loads) == 0  # joins the instance already serving high priority
    assert d.choose(req(), loads) == 1  # normal avoids it


def test_pairing_as_the_artifact():
    """Sources: below the threshold or holding a preempted request; destinations: above it, none preempted; most
    loaded with freest, pairs with a migrating instance skipped (not re-paired)."""
    p = make_pairing_policy("freeness", threshold=3)
    loads = [load(0, -5), load(1, 100), load(2, 1), load(3, 40), load(4, 3), load(5, 10, inn=False)]
    assert p.pairs(loads, 0.0) == [(0, 1), (2, 3)]
    assert make_pairing_policy("none", threshold=3).pairs(loads, 0.0) == []
    drain = [load(0, 0, draining=True), load(1, 10)]
    assert p.pairs(drain, 0.0) == [(0, 1)]
    assert p.pairs([load(0, -5, out=False), load(1, 100)], 0.0) == []
    # a preempted request makes a source whatever its freeness, and never a destination
    assert p.pairs([load(0, 50, preempted=1), load(1, 100, preempted=1), load(2, 20)], 0.0) == [(0, 2)]
    # the second-freest destination is not offered to the second source when the first pair is skipped
    assert p.pairs([load(0, -5, out=False), load(1, -1), load(2, 100), load(3, 50)], 0.0) == [(1, 3)]



def test_pairing_cooldown_against_ping_pong():
    """``migration_cooldown_s`` (llumnix-hysteresis): an instance into which a migration began is no source until that
    many seconds have passed (a draining one still is); the next loaded source pairs instead. A pair that started
    nothing (its source had no request to move) does not count. Without it (the paper's pairing) the instance that
    just received sends straight back."""
    paper = make_pairing_policy("freeness", threshold=3)
    cool = make_pairing_policy("freeness", threshold=3, config=PairingConfig(migration_cooldown_s=10.0))
    first = [load(0, -5), load(1, 100)]
    assert paper.pairs(first, 0.0) == cool.pairs(first, 0.0) == [(0, 1)]
    back = [load(0, 50), load(1, -2)]  # instance 1 took the request and fell below the threshold
    assert cool.pairs(back, 1.0) == [(1, 0)]  # pairing (0, 1) alone started nothing
    for p in (paper, cool):
        p.migration_started(0, 1, 0.0)
    assert paper.pairs(back, 1.0) == [(1, 0)]
    assert cool.pairs(back, 1.0) == []
    assert cool.pairs([load(0, 50), load(1, -2), load(2, -1)], 1.0) == [(2, 0)]  # the next source pairs instead
    assert cool.pairs([load(0, 50), load(1, 0, draining=True)], 5.0) == [(1, 0)]  # draining: always a source
    cool.migration_started(1, 0, 5.0)
    assert cool.pairs(back, 9.9) == []  # a migration into instance 1 began at 0
    assert cool.pairs(back, 10.0) == [(1, 0)]  # ... 10 s ago: a source again
    assert cool.pairs([load(0, -2), load(1, 50)], 14.9) == []  # one into instance 0 began at 5
    assert cool.pairs([load(0, -2), load(1, 50)], 15.0) == [(0, 1)]
    with pytest.raises(ValueError, match="migration_cooldown_s"):
        PairingConfig(migration_cooldown_s=-1)


def test_artifact_scaler():
    """Cluster freeness sum(free - watermark - queued) / sum(running + waiting); scale up by as many empty instances
    as it takes, none before the first check, a drain cancelled by a scale-up; scale down the newest instance when
    the cluster without it is still above the band."""
    cfg = ScalingConfig(scale_up=10, scale_down=60, min_instances=1, max_instances=16, first_check_s=110)
    s = Scaler(cfg)
    busy = [load(i, 0, running=40, free=107, watermark=7) for i in range(4)]  # (100 * 4) / 160 = 2.5 < 10
    assert s.decide(busy, 0, now=100).start == 0  # not yet
    # (400 + k * 792) / 160 >= 10  ->  k = ceil((1600 - 400) / 792) = 2
    assert s.decide(busy, 0, now=120).start == 2
    assert s.decide(busy, 1, now=120).start == 0  # instances still starting
    assert s.decide([*busy[:3], load(3, 0, running=40, free=107, draining=True)], 0, now=120).cancel_drain == 3
    idle = [load(i, 500, running=1, free=700, total=792, watermark=7) for i in range(3)]
    # without instance 2: (700 + 700 + 700 - 792 - 14) / 3 = 431 > 60
    assert s.decide(idle, 0, now=120).drain == 2
    assert s.decide(idle[:1], 0, now=120).drain is None  # at min
    assert s.decide([*idle[:2], load(2, 0, draining=True, running=1, free=700)], 0, now=120) == s.decide([], 0, 0)
    with pytest.raises(ValueError, match="scale-up"):
        ScalingConfig(scale_up=70, scale_down=60)


def test_mean_freeness_scaler_band():
    s = Scaler(ScalingConfig(scale_up=10, scale_down=60, min_instances=1, max_instances=3, rule="mean-freeness"))
    assert s.decide([load(0, 5), load(1, 8)], 0).start == 1
    assert s.decide([load(0, 5), load(1, 8)], 1).start == 0  # one start at a time
    assert s.decide([load(0, 5), load(1, 8), load(2, 1)], 0).start == 0  # at max
    d = s.decide([load(0, 100, running=3), load(1, 80, running=1)], 0)
    assert d.drain == 1  # fewest running
    assert s.decide([load(0, 100)], 0).drain is None  # at min


def test_systems_compose_policies():
    assert not GlobalScheduler(SystemConfig(policy="infaas++")).migrates
    assert GlobalScheduler(SystemConfig(policy="llumnix")).migrates
    assert not GlobalScheduler(SystemConfig(policy="llumnix", migration=False)).migrates
    with pytest.raises(ValueError, match="--policy"):
        SystemConfig(policy="nope")



def test_named_systems_are_llumnix_with_their_options_and_a_given_value_wins():
    """The paper's systems set no option (the defaults follow the authors' code); this project's named systems are
    Llumnix's policies with the options they name; an option the user gives wins over the system's."""
    for name in PAPER_SYSTEMS:
        assert not SYSTEMS[name].options
        c = SystemConfig(policy=name)
        assert (c.candidate, c.migration_cooldown_s) == ("lcfs", 0.0)
    for name in set(SYSTEMS) - set(PAPER_SYSTEMS):
        assert SYSTEMS[name].options and (SYSTEMS[name].dispatch, SYSTEMS[name].pairing) == ("freeness", "freeness")
    sized, hyst = SystemConfig(policy="llumnix-sized"), SystemConfig(policy="llumnix-hysteresis")
    assert (sized.candidate, sized.migration_cooldown_s) == ("fewest-blocks", 0.0)
    assert (hyst.candidate, hyst.migration_cooldown_s) == ("lcfs", 10.0)
    assert GlobalScheduler(hyst).pairing.config.migration_cooldown_s == 10.0 and GlobalScheduler(hyst).migrates
    assert GlobalScheduler(SystemConfig()).pairing.config.migration_cooldown_s == 0.0
    assert SystemConfig(policy="llumnix-sized", candidate="lcfs").candidate == "lcfs"
    assert SystemConfig(policy="llumnix-hysteresis", migration_cooldown_s=2.5).migration_cooldown_s == 2.5
    assert SystemConfig(policy="llumnix", candidate="fewest-blocks").candidate == "fewest-blocks"
    assert not SystemConfig(policy="llumnix-sized", migration=False).migrates


def test_serving_cluster_takes_the_named_systems():
    """``llumnix serve --policy llumnix-sized``: every instance actor's llumlet gets the system's candidate (its spec),
    the global scheduler the system's options; a flag given wins."""
    from llumnix.runtime.serve_config import build_serve_config

    sized = build_serve_config({}, {"policy": "llumnix-sized"})
    assert sized.instance.candidate == "fewest-blocks" and sized.migrates
    assert sized.system_config() == SystemConfig(policy="llumnix-sized")
    assert build_serve_config({}, {"policy": "llumnix"}).instance.candidate == "lcfs"
    assert build_serve_config({}, {"policy": "llumnix-sized", "candidate": "artifact"}).instance.candidate == "artifact"
    hyst = build_serve_config({}, {"policy": "llumnix-hysteresis"}).system_config()
    assert hyst.migration_cooldown_s == 10.0 and hyst.candidate == "lcfs"
    assert not build_serve_config({}, {"policy": "infaas++"}).migrates
