"""Pulumi dynamic resources over :mod:`controlplane`, one module per resource.

| resource | module | controlplane |
|---|---|---|
| ``StateTable`` | :mod:`.state_table` | ``store.ensure_table`` + ``store.save_pool``; delete ends the pool's instances + ``store.delete_table`` |
| ``ResourceClassPool`` | :mod:`.resource_class_pool` | ``pool.ensure_queues`` (one class); delete ``pool.delete_queue`` |
| ``LaunchTemplate`` | :mod:`.launch_template` | ``launch_template.ensure`` (new default version); ``.delete`` |
| ``RegistrationToken`` | :mod:`.registration_token` | ``token.ensure_tokens``; ``token.delete_tokens`` |
| ``RunnerFleet`` | :mod:`.runner_fleet` | ``provision.provision``; delete ``release.release`` |

Type tokens are ``pulumi-python:dynamic/runnerpool:<Name>``. The provider
classes are pickled by reference, so this package must stay importable (under
this name) wherever ``pulumi`` runs the provider host: the project root is its
working directory. This package never imports boto3; ``controlplane.aws``
does. See :mod:`dynamic_providers._base` for the rules every provider follows.
"""
from __future__ import annotations

from dynamic_providers.launch_template import LaunchTemplate, LaunchTemplateArgs, LaunchTemplateProvider
from dynamic_providers.registration_token import (
    RegistrationToken,
    RegistrationTokenArgs,
    RegistrationTokenProvider,
)
from dynamic_providers.resource_class_pool import (
    ResourceClassPool,
    ResourceClassPoolArgs,
    ResourceClassPoolProvider,
)
from dynamic_providers.runner_fleet import RunnerFleet, RunnerFleetArgs, RunnerFleetProvider
from dynamic_providers.state_table import StateTable, StateTableArgs, StateTableProvider

__all__ = [
    "LaunchTemplate", "LaunchTemplateArgs", "LaunchTemplateProvider",
    "RegistrationToken", "RegistrationTokenArgs", "RegistrationTokenProvider",
    "ResourceClassPool", "ResourceClassPoolArgs", "ResourceClassPoolProvider",
    "RunnerFleet", "RunnerFleetArgs", "RunnerFleetProvider",
    "StateTable", "StateTableArgs", "StateTableProvider",
]
