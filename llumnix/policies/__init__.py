"""Global-scheduling policies: dispatch, migration pairing and scaling, each a small class registered by name.

Policies see only ``InstanceLoad`` reports: they never know whether a simulator or a real cluster runs them.
"""

from llumnix.policies.dispatch import DISPATCH_POLICIES, DispatchPolicy, make_dispatch_policy
from llumnix.policies.pairing import PAIRING_POLICIES, PairingPolicy, make_pairing_policy
from llumnix.policies.scaling import Scaler, ScalingConfig, ScalingDecision

__all__ = [
    "DISPATCH_POLICIES",
    "DispatchPolicy",
    "make_dispatch_policy",
    "PAIRING_POLICIES",
    "PairingPolicy",
    "make_pairing_policy",
    "ScalingConfig",
    "ScalingDecision",
    "Scaler",
]
