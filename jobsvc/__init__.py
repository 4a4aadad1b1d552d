"""jobsvc: run commands on a Linux host inside cgroup limits, with complete output for many readers.

Kept import-free: the CLI imports jobsvc.model and jobsvc._pb, and must not pay for the engine.
"""

__version__ = "0.1.0"
