"""What both worker roles share: the ``EngineWorker`` base and the router<->worker protocol."""
