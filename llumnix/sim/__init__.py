"""Discrete-event runtime: drives the real scheduling core in virtual time with profile-driven step times."""

from llumnix.sim.simulator import SimConfig, SimResult, Simulator, simulate

__all__ = ["SimConfig", "SimResult", "Simulator", "simulate"]
