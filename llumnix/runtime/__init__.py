"""Real-time runtimes: an engine instance's step loop (``instance``) and the Ray cluster (``ray``)."""
