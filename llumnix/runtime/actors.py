"""Where instance actors run: in Ray (one process per instance, anywhere in the Ray cluster) or in this process.

The cluster manager talks to its instance actors only through a handle (``handle.method.remote(*args)`` is awaited)
and a launcher (start, kill, what resources there are, how a dead actor shows). ``RayLauncher`` is the serving
default. ``LocalLauncher`` runs the same actor classes as objects on this process's event loop, with arguments and
results copied as Ray would serialize them: the lock-step harness (``llumnix.runtime.lockstep``) runs a whole cluster
that way on a virtual clock, and tests use it to drive the cluster's code without Ray.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any


class ActorLauncher(ABC):
    #: The exception an actor call raises when the actor is dead.
    actor_died: type[BaseException] = RuntimeError

    @abstractmethod
    def launch(self, cls: type, instance_id: int, *args: Any, num_cpus: float = 1.0, num_gpus: float = 0.0) -> Any:
        """Start ``cls(instance_id, *args)`` as an actor; return its handle."""

    @abstractmethod
    def kill(self, handle: Any) -> None:
        """Stop the actor now, whatever it is doing."""

    @abstractmethod
    def resources(self) -> dict[str, float]:
        """The cluster's total resources (CPU, GPU, ...)."""

    def available(self) -> dict[str, float]:
        """The cluster's resources not held now (what a new actor could get)."""
        return self.resources()

    def placed(self, handle: Any) -> bool:
        """Whether the actor got its resources (a worker runs it, or it is already dead), rather than waiting for
        them; True when this cannot be told."""
        return True

    def node_address(self) -> str:
        """This node's address (where a KV rendezvous store listens)."""
        return "127.0.0.1"


class RayLauncher(ActorLauncher):
    def __init__(self) -> None:
        import ray

        self.actor_died = ray.exceptions.RayActorError

    def launch(self, cls: type, instance_id: int, *args: Any, num_cpus: float = 1.0, num_gpus: float = 0.0) -> Any:
        import ray

        options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_concurrency": 1000}
        return ray.remote(cls).options(**options).remote(instance_id, *args)

    def kill(self, handle: Any) -> None:
        import ray

        ray.kill(handle, no_restart=True)

    def resources(self) -> dict[str, float]:
        import ray

        return ray.cluster_resources()

    def available(self) -> dict[str, float]:
        import ray

        return ray.available_resources()

    def placed(self, handle: Any) -> bool:
        """From Ray's actor table (GCS): an actor waiting for resources is PENDING_CREATION without a worker process
        (pid 0); once leased a worker, it has one while its constructor runs. An actor the table does not have yet
        (Ray registers a new actor asynchronously: the table answers ``{}`` just after ``.remote()``) is not placed
        either; taken for placed, a start that can never be placed waited for the startup timeout instead."""
        from ray._private import state

        try:
            info = state.actors(handle._actor_id.hex())
        except Exception:  # Ray's private state API moved: leave it to the startup timeout
            return True
        if not info:
            return False
        return bool(info.get("Pid")) or info.get("State") not in ("PENDING_CREATION", "DEPENDENCIES_UNREADY")

    def node_address(self) -> str:
        """Loopback while the Ray cluster is this one host (nothing it listens on for KV need be reachable from
        outside); this node's address once other nodes have joined."""
        import ray

        if len([n for n in ray.nodes() if n.get("Alive")]) <= 1:
            return "127.0.0.1"
        return ray.util.get_node_ip_address()


class LocalActorDied(RuntimeError):
    """The in-process actor was killed."""


_HANDLES: dict[int, LocalActor] = {}  # live in-process actors by key: a pickled handle is its key
_handle_keys = itertools.count()


def _handle(key: int) -> LocalActor:
    return _HANDLES[key]


class LocalActor:
    """A Ray-like handle on an object of this process: ``handle.method.remote(*args)`` runs the method as a task on
    the running event loop and returns it (await it for the result). Arguments and results are copied through
    pickle, as Ray's serialization copies them; a handle pickles as a reference to the same actor."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj
        self._dead = False
        self._key = next(_handle_keys)
        _HANDLES[self._key] = self

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("__"):
            raise AttributeError(name)
        return _LocalMethod(self, name)

    def __reduce__(self):
        return _handle, (self._key,)

    def kill(self) -> None:
        self._dead = True
        _HANDLES.pop(self._key, None)
        terminate = getattr(self._obj, "terminate", None)
        if terminate is not None:
            terminate()


class _LocalMethod:
    def __init__(self, handle: LocalActor, name: str) -> None:
        self._handle, self._method_name = handle, name

    def remote(self, *args: Any, **kwargs: Any) -> asyncio.Task:
        args, kwargs = _copied((args, kwargs))
        return asyncio.get_running_loop().create_task(self._call(args, kwargs))

    async def _call(self, args: tuple, kwargs: dict) -> Any:
        handle = self._handle
        if handle._dead:
            raise LocalActorDied(f"actor {type(handle._obj).__name__} is dead ({self._method_name})")
        result = getattr(handle._obj, self._method_name)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        if handle._dead:
            raise LocalActorDied(f"actor {type(handle._obj).__name__} died during {self._method_name}")
        return _copied(result)


def _copied(value: Any) -> Any:
    return pickle.loads(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


class LocalLauncher(ActorLauncher):
    """Actors as objects of this process, on its event loop (see ``LocalActor``). ``clock`` and ``actor_kwargs`` are
    passed to every actor (e.g. a virtual clock)."""

    actor_died = LocalActorDied

    def __init__(self, resources: dict[str, float] | None = None, clock: Callable[[], float] | None = None,
                 **actor_kwargs: Any) -> None:
        self._resources = resources or {"CPU": 1e9, "GPU": 1e9}
        self.actor_kwargs = {**actor_kwargs, **({"clock": clock} if clock is not None else {})}
        self.handles: list[LocalActor] = []

    def launch(self, cls: type, instance_id: int, *args: Any, num_cpus: float = 1.0, num_gpus: float = 0.0) -> Any:
        handle = LocalActor(cls(instance_id, *args, **self.actor_kwargs))
        self.handles.append(handle)
        return handle

    def kill(self, handle: Any) -> None:
        handle.kill()

    def resources(self) -> dict[str, float]:
        return dict(self._resources)
