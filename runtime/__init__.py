"""The runtime every stage and method shares: errors, progress, preemption, outputs, failpoints,
read-ahead and the non-finite guard. Imports only ``influence/``, ``parallel/`` and
``checkpoints/``."""
