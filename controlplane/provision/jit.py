"""Just-in-time runners for an ephemeral class: one per created instance, its config in the row.

An ephemeral instance is never reused, so it registers no runner with the
pool's token: the control plane asks GitHub for one just-in-time runner per
created instance (``generate-jitconfig``: its name, the run's labels, one
job) and writes the encoded config into that instance's ``created`` row
(:func:`controlplane.store.set_registration`) right after the row exists.
Runners of instances that will never run them (a rollback, an emergency) are
deleted again, best effort: reconcile removes any that remain.
"""
from __future__ import annotations

from controlplane import aws, store
from controlplane.errors import RunnerPoolError
from controlplane.github import GitHubClient
from controlplane.logs import event
from controlplane.records import JIT_CONFIG, Member, State
from controlplane.store import Pool


def deliver(pool: Pool, github: GitHubClient, run_id: str, members: list[Member]) -> dict[str, int]:
    """One just-in-time runner per created instance; instance id -> its runner's GitHub id.

    The name is the one the agent gives its first runner (``<instance-id>-1``),
    the labels the run's and the pool's, as a registration from config.sh would have.
    """
    cfg = pool.config

    def one(m: Member) -> tuple[str, int]:
        jit = github.jit_config(f"{m.instance_id}-1", [run_id, cfg.pool_label], cfg.github.runner_group_id)
        if not store.set_registration(pool, m.instance_id, run_id, State.CREATED, JIT_CONFIG, jit.encoded):
            event("jit.row_moved", run_id=run_id, instance_id=m.instance_id)
        return m.instance_id, jit.runner_id

    out = dict(aws.parallel(one, members))
    event("jit.delivered", run_id=run_id, instance_ids=sorted(out), runner_ids=sorted(out.values()))
    return out


def delete_runners(github: GitHubClient, runners: dict[str, int]) -> None:
    """Best effort: just-in-time runners of instances that will never run them."""
    for iid, runner_id in runners.items():
        try:
            github.delete_runner(runner_id)
        except RunnerPoolError as exc:
            event("jit.delete_failed", instance_id=iid, runner_id=runner_id, error=str(exc))
