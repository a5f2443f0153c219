"""Sans-I/O scheduling core shared by the simulator and the real runtime.

Layers (imports only go downwards): request + block_manager -> local_scheduler -> llumlet (load, migration).
Nothing here knows about clocks, threads, Ray or sockets: callers pass ``now`` in seconds.
"""

from llumnix.core.block_manager import BlockManager, BlockManagerError
from llumnix.core.request import Request, RequestStatus

__all__ = ["BlockManager", "BlockManagerError", "Request", "RequestStatus"]
