"""runner-pool's control plane: provision, release, refresh and reconcile EC2 runners.

Nothing here imports Pulumi; ``dynamic_providers`` adapts these functions to
Pulumi dynamic resources and ``controlplane.cli`` to the ``runner-pool`` command.
The operations are imported lazily so ``import controlplane`` stays cheap (the
instance agent and the local emulator import submodules of this package).
"""
from __future__ import annotations

from typing import Any

__all__ = ["provision", "release", "refresh", "reconcile"]


def __getattr__(name: str) -> Any:
    if name == "provision":
        from controlplane.provision import provision
        return provision
    if name == "release":
        from controlplane.release import release
        return release
    if name == "refresh":
        from controlplane.refresh import refresh
        return refresh
    if name == "reconcile":
        from controlplane.reconcile import reconcile
        return reconcile
    raise AttributeError(name)
