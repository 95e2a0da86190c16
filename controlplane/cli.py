"""The ``runner-pool`` command: the same operations as the Pulumi resources.

Exit codes: 0 success, 1 an operation failed (after cleaning up, and saying
what it cleaned), 2 bad input (nothing in AWS was touched). Errors print as
one line ``error: <message> (<hint>)``; set ``RUNNER_POOL_DEBUG=1`` for a
traceback. ``--json`` prints exactly one JSON document on stdout; progress and
logs go to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from controlplane import inputs
from controlplane.errors import ConfigError, ConfigErrors, RunnerPoolError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one ``error:`` line naming it (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {_argument_problem(message, self.prog)}\n")


def _argument_problem(message: str, prog: str) -> str:
    """argparse's message as ``<argument>: <what is wrong> (<the fix>)``."""
    fix = f"see `{prog} --help`"
    required = re.match(r"the following arguments are required: (.+)$", message)
    if required:
        return f"{required.group(1)}: required ({fix})"
    arg = re.match(r"argument (\S+?): (.+)$", message)
    if not arg:
        return f"{message} ({fix})"
    name, problem = arg.groups()
    choice = re.match(r"invalid choice: (.+?) \(choose from (.+)\)$", problem)
    if choice:
        value, choices = choice.group(1), choice.group(2).replace("'", "")
        return f"{name}: {value} is not a choice (use one of: {choices})"
    problem = problem.replace("not allowed with argument ", "not allowed with ")
    if not problem.endswith(")"):                # a type function's message may carry its own fix
        problem += f" ({fix})"
    return f"{name}: {problem}"


def _whole_number(text: str) -> int:
    """``--count``: a whole number (its range is checked with the request)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (pass e.g. --count 3)") from None


def _emit(args: argparse.Namespace, payload: Any, human: Callable[[], None]) -> None:
    from controlplane.store import SKIPPED

    skipped = SKIPPED.snapshot()             # rows a reader could not parse: skipped, reported here
    if skipped and isinstance(payload, dict):
        payload = {**payload, "skipped_rows": skipped}
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=None, default=str))
    else:
        human()
        if skipped:
            print(f"warning: skipped {len(skipped)} unreadable row(s): "
                  + "; ".join(f"{r['pk']} ({r['reason']})" for r in skipped), file=sys.stderr)


def _region(args: argparse.Namespace) -> str:
    """--region, else $AWS_REGION, else $AWS_DEFAULT_REGION, else us-east-1; checked before any AWS call."""
    for source, value in (("--region", args.region), ("AWS_REGION", os.environ.get("AWS_REGION")),
                          ("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION"))):
        if value:
            return inputs.check_region(value, source)
    return "us-east-1"


def _load_cfg(path: str) -> Any:
    from controlplane.config import load_config, with_env_overrides

    return with_env_overrides(load_config(path))


def _pool(args: argparse.Namespace) -> Any:
    """The pool named by --pool (stored config) or --config (file, which must be applied)."""
    from controlplane import store

    if getattr(args, "config", None):
        cfg = _load_cfg(args.config)
        return store.load_pool(cfg.name, cfg.region)
    if getattr(args, "pool", None):
        if not re.match(r"^[a-z][a-z0-9-]{0,29}$", args.pool):
            raise ConfigError(f"--pool {args.pool!r} is not a pool name",
                              hint="lowercase letters, digits and '-', max 30")
        return store.load_pool(args.pool, _region(args))
    raise ConfigError("no pool given", hint="pass --pool NAME or --config FILE")


def _github(cfg: Any, required: bool = True) -> Any:
    """The GitHub client from the environment, its token proven with one read before any AWS change.

    ``required=False``: no token means None (the command works without GitHub);
    a token that is set but rejected is still bad input.
    """
    from controlplane.github import github_client_for

    try:
        gh = github_client_for(cfg.github)
    except ConfigError:
        if required:
            raise
        return None
    gh.check_access()
    return gh


def _check_run_id(run_id: str) -> str:
    return inputs.check_run_id(run_id, "--run-id")


# ------------------------------------------------------------------ commands

def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args.file)
    from controlplane import launch_template

    launch_template.render(cfg)
    _emit(args, {"ok": True, "pool": cfg.name, "resource_classes": sorted(cfg.resource_classes)},
          lambda: print(f"ok: pool {cfg.name!r}, {len(cfg.resource_classes)} resource class(es), "
                        f"{len(cfg.subnets)} subnet(s)"))
    return 0


def cmd_pool_apply(args: argparse.Namespace) -> int:
    from controlplane import launch_template
    from controlplane.apply import apply_pool
    from controlplane.logs import Progress

    cfg = _load_cfg(args.config)
    launch_template.render(cfg)                 # the user data size: a config problem, found before GitHub
    res = apply_pool(cfg, _github(cfg), progress=Progress(not args.json))
    _emit(args, res.to_dict(), lambda: print(
        f"applied pool {res.pool}: table {res.table}{' (created)' if res.table_created else ''}, "
        f"queues {', '.join(sorted(res.queues))}, launch template {res.launch_template_id} "
        f"v{res.launch_template_version}{' (new version)' if res.launch_template_changed else ''}, "
        f"tokens {'rotated' if res.tokens_rotated else 'fresh'}"))
    return 0


def cmd_pool_destroy(args: argparse.Namespace) -> int:
    from controlplane.apply import destroy_pool
    from controlplane.logs import Progress

    cfg = _load_cfg(args.config) if args.config else _pool(args).config
    res = destroy_pool(cfg, _github(cfg, required=False), progress=Progress(not args.json))
    _emit(args, res.to_dict(), lambda: print(
        f"destroyed pool {res.pool}: {len(res.terminated)} instance(s) terminated, queues "
        f"{', '.join(res.queues_deleted) or 'none'} deleted, {res.runners_deleted} runner(s) removed, "
        f"table {'deleted' if res.table_deleted else 'absent'}"))
    return 0


def cmd_local_start(args: argparse.Namespace) -> int:
    from controlplane.local import control

    if args.config and not args.enforce_iam:
        raise ConfigError("--config is given without --enforce-iam",
                          hint="--config names the pool whose IAM user `local env` exports")
    if args.config:
        _load_cfg(args.config)                 # a bad config is bad input before anything starts
    state, started = control.start(args.state_dir, enforce_iam=args.enforce_iam,
                                   pool_config=Path(args.config) if args.config else None)
    _emit(args, {**state, "started": started}, lambda: print(
        f"local AWS emulator {'started' if started else 'already running'} at {state['aws_url']} "
        f"(GitHub stand-in {state['github_url']}); run: eval \"$(runner-pool local env)\""))
    return 0


def cmd_local_stop(args: argparse.Namespace) -> int:
    from controlplane.local import control

    res = control.stop(args.state_dir)
    _emit(args, res, lambda: print(
        ("stopped the local emulator" if res["stopped"] else "the local emulator was not running")
        + (f"; killed {res['stray_agents_killed']} leftover agent process(es)" if res["stray_agents_killed"] else "")))
    return 0


def cmd_local_env(args: argparse.Namespace) -> int:
    from controlplane.local import control

    state = control.read_state(args.state_dir)
    if state is None:
        raise ConfigError("the local emulator is not running", hint="run `runner-pool local start` first")
    env = control.env_vars(state)
    _emit(args, env, lambda: print("\n".join(f"export {k}={v}" for k, v in env.items())))
    return 0


def cmd_local_status(args: argparse.Namespace) -> int:
    from controlplane.local import control

    state = control.read_state(args.state_dir)
    payload = {"running": state is not None, **(state or {})}
    _emit(args, payload, lambda: print(json.dumps(payload, indent=2)))
    return 0 if state else 1


def _prewarm_github() -> None:
    """Import githubkit in a thread while the command waits on AWS (it takes about a quarter of a
    second, and a provision or release needs it only after its first AWS calls)."""
    import threading

    def load() -> None:
        try:
            import githubkit
            import githubkit.exception  # noqa: F401
        except ImportError:
            pass                        # the command's own import reports it

    threading.Thread(target=load, name="prewarm-githubkit", daemon=True).start()


def cmd_provision(args: argparse.Namespace) -> int:
    from controlplane.logs import Progress

    run_id = _check_run_id(args.run_id)
    inputs.check_count(args.count, "--count")
    p = _pool(args)                     # the first AWS call, before the provision's own imports
    _prewarm_github()
    from controlplane.provision import ProvisionRequest, provision

    req = ProvisionRequest(run_id=run_id, resource_class=args.resource_class, count=args.count,
                           usage_class=args.usage_class)
    result = provision(p, req, progress=Progress(not args.json))
    _emit(args, result.to_dict(), lambda: print(result.summary()))
    return 0 if result.ok else 1


def cmd_release(args: argparse.Namespace) -> int:
    from controlplane.logs import Progress

    run_id = _check_run_id(args.run_id)
    p = _pool(args)
    _prewarm_github()
    from controlplane.release import release

    res = release(p, run_id, progress=Progress(not args.json))
    _emit(args, res.to_dict(), lambda: print(res.summary()))
    return 0 if res.ok else 1


def cmd_refresh(args: argparse.Namespace) -> int:
    from controlplane import store
    from controlplane.logs import Progress
    from controlplane.refresh import refresh

    # --config refreshes towards the file (a changed AMI, a removed class); --pool keeps the stored config.
    # Either way the pool must exist: creating one is `pool apply`'s job.
    cfg = _load_cfg(args.config) if args.config else _pool(args).config
    if args.config:
        store.load_pool(cfg.name, cfg.region)
    res = refresh(cfg, _github(cfg), progress=Progress(not args.json))
    _emit(args, res.to_dict(), lambda: print(res.summary()))
    return 0 if res.ok else 1


def cmd_reconcile(args: argparse.Namespace) -> int:
    from controlplane.logs import Progress

    p = _pool(args)                     # the first AWS call, before the command's own imports
    from controlplane.reconcile import reconcile

    res = reconcile(p, dry_run=args.dry_run, github=_github(p.config, required=False),
                    progress=Progress(not args.json))
    _emit(args, res.to_dict(), lambda: print(res.summary()))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    p = _pool(args)                     # the first AWS call, before the command's own imports
    from controlplane.status import pool_status

    st = pool_status(p)
    _emit(args, st.to_dict(), lambda: print(st.render()))
    return 0


def cmd_iam(args: argparse.Namespace) -> int:
    from controlplane import iam

    if not re.match(r"^\d{12}$", args.account):
        raise ConfigError(f"--account {args.account!r} is not an AWS account id", hint="pass 12 digits")
    if args.instance_role is not None and not re.match(r"^[\w+=,.@-]{1,64}$", args.instance_role):
        raise ConfigError(f"--instance-role {args.instance_role!r} is not a role name",
                          hint="the name of the role in the pool's instance profile")
    cfg = _load_cfg(args.config)
    names = [args.policy] if args.policy else list(iam.POLICY_NAMES)
    docs = {n: iam.policy(n, cfg, args.account, args.partition, args.instance_role) for n in names}
    print(json.dumps(docs[args.policy] if args.policy else docs, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from controlplane.demo import run_demo

    return run_demo(json_output=args.json, state_dir=args.state_dir)


# ------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="runner-pool", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        p.set_defaults(func=fn)
        return p

    def pool_args(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--pool", help="pool name (reads the config `pool apply` stored)")
        g.add_argument("--config", help="pool config file (pool.yaml)")
        p.add_argument("--region", help="AWS region of --pool (default: $AWS_REGION or us-east-1)")

    cfg = sub.add_parser("config", help="check a pool configuration").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    p = add("check", cmd_config_check, "validate a pool.yaml; print every problem, exit 2 if any", cfg)
    p.add_argument("file")

    pool = sub.add_parser("pool", help="apply or destroy a pool without Pulumi").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    p = add("apply", cmd_pool_apply, "create or update the pool's table, queues, launch template and tokens", pool)
    p.add_argument("--config", required=True)
    p = add("destroy", cmd_pool_destroy, "terminate the pool's instances and remove all its resources", pool)
    pool_args(p)

    local = sub.add_parser("local", help="the embedded default: local AWS, GitHub stand-in, simulated instances"
                           ).add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    for name, fn, h in (("start", cmd_local_start, "start the local emulator in the background"),
                        ("stop", cmd_local_stop, "stop it and every simulated instance"),
                        ("env", cmd_local_env, "print the export lines that point a shell at it"),
                        ("status", cmd_local_status, "say whether it runs, and where")):
        p = add(name, fn, h, local)
        p.add_argument("--state-dir", type=Path, default=None, help="default: ~/.runner-pool/local")
        if name == "start":
            p.add_argument("--enforce-iam", action="store_true",
                           help="moto enforces IAM: the control plane and the agents sign with the pool's policies")
            p.add_argument("--config", default=None, help="with --enforce-iam: the pool whose user `local env` exports")

    p = add("provision", cmd_provision, "hand a run N registered runners, or nothing")
    pool_args(p)
    p.add_argument("--run-id", required=True)
    p.add_argument("--resource-class", required=True)
    p.add_argument("--count", type=_whole_number, default=1)
    p.add_argument("--usage-class", choices=["spot", "on-demand"], default=None)

    p = add("release", cmd_release, "give a run's runners back to the pool")
    pool_args(p)
    p.add_argument("--run-id", required=True)

    p = add("refresh", cmd_refresh, "converge template, queues, tokens; terminate expired; reconcile")
    pool_args(p)

    p = add("reconcile", cmd_reconcile, "repair drift between the table, EC2 and GitHub")
    pool_args(p)
    p.add_argument("--dry-run", action="store_true", help="report, change nothing")

    p = add("status", cmd_status, "instances of a pool by state, queue depths")
    pool_args(p)

    p = sub.add_parser("iam", help="print the IAM policies of a pool as JSON (docs/security.md)",
                       description="print the IAM policies of a pool as JSON (docs/security.md)")
    p.set_defaults(func=cmd_iam)
    p.add_argument("--config", required=True, help="pool config file (pool.yaml)")
    p.add_argument("--account", required=True, help="AWS account id the pool lives in")
    p.add_argument("--partition", choices=["aws", "aws-cn", "aws-us-gov"], default="aws")
    p.add_argument("--policy", choices=["control-plane", "pool-admin", "instance"], default=None,
                   help="print only this policy document (default: all three, by name)")
    p.add_argument("--instance-role", default=None,
                   help="role in the pool's instance profile (default: the one createInstanceRole makes)")

    p = add("demo", cmd_demo, "run the whole product on the embedded default, then clean up")
    p.add_argument("--state-dir", type=Path, default=None)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from controlplane import logs

    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure()
    try:
        return int(args.func(args))
    except ConfigErrors as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except RunnerPoolError as exc:
        if os.environ.get("RUNNER_POOL_DEBUG"):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted (run `runner-pool reconcile` to clean up anything left)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence prints one line, not a traceback
        from controlplane import aws

        if os.environ.get("RUNNER_POOL_DEBUG"):
            traceback.print_exc()
        down = aws.unreachable(exc)          # an SDK call no adapter function wrapped
        if down is not None:
            print(f"error: cannot reach AWS: {down.detail} (check AWS_ENDPOINT_URL, the network and credentials; "
                  "for the embedded default run `runner-pool local start` and `eval \"$(runner-pool local env)\"`)",
                  file=sys.stderr)
            return 1
        print(f"error: internal error: {type(exc).__name__}: {exc} (set RUNNER_POOL_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
