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
from typing import TYPE_CHECKING, Any, NoReturn

from controlplane import inputs
from controlplane.errors import ConfigError, ConfigErrors, RunnerPoolError

if TYPE_CHECKING:                           # imported where used: a command loads only what it needs
    from controlplane.config import PoolConfig
    from controlplane.github import GitHubClient
    from controlplane.store import Pool


class ArgumentProblem(ConfigError):
    """A bad command line, about ``argument`` (``--count``, ``COMMAND``; None: the line as a whole).

    Printed as ``error: <argument>: <problem> (<hint>)``, exit 2, like every other bad input.
    """

    def __init__(self, argument: str | None, problem: str, hint: str) -> None:
        super().__init__(f"{argument}: {problem}" if argument else problem, hint)
        self.argument = argument


class _BadValue(argparse.ArgumentTypeError):
    """What a ``type=`` function raises: the problem and its fix, kept apart.

    argparse wraps it in an ArgumentError raised while handling it, so the
    parser finds it again as that error's ``__context__``.
    """

    def __init__(self, problem: str, hint: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint


def _name(action: argparse.Action) -> str:
    """How the user spells an argument: its option strings, else its metavar or dest (as argparse does)."""
    return "/".join(action.option_strings) or str(action.metavar or action.dest)


class _Parser(argparse.ArgumentParser):
    """argparse, but every bad argument raises :class:`ArgumentProblem` (no usage block, no exit here).

    With ``exit_on_error=False`` argparse raises its ArgumentError (which names the
    argument) instead of printing; the two checks it still reports only as English
    text through :meth:`error` are made here instead: missing required arguments
    (argparse's own check is switched off for the parse and redone over the
    actions) and unrecognized arguments (``parse_args`` over ``parse_known_args``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["exit_on_error"] = False
        super().__init__(*args, **kwargs)

    def _fix(self) -> str:
        return f"see `{self.prog} --help`"

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
    ) -> tuple[argparse.Namespace, list[str]]:
        self._unchecked = [action for action in self._actions if action.required]
        self._mark_required(False)
        try:
            parsed, extras = super().parse_known_args(args, namespace)
        except argparse.ArgumentError as exc:
            raise self._problem(exc) from None
        finally:
            self._mark_required(True)
            unchecked, self._unchecked = self._unchecked, []
        missing = [_name(action) for action in unchecked if getattr(parsed, action.dest, None) is None]
        if missing:
            raise ArgumentProblem(", ".join(missing), "required", self._fix())
        return parsed, extras

    def _mark_required(self, required: bool) -> None:
        for action in getattr(self, "_unchecked", []):
            action.required = required

    def format_usage(self) -> str:
        """As declared, also while parsing (``--help`` prints in the middle of a parse)."""
        self._mark_required(True)
        try:
            return super().format_usage()
        finally:
            self._mark_required(False)

    def format_help(self) -> str:
        self._mark_required(True)
        try:
            return super().format_help()
        finally:
            self._mark_required(False)

    def _problem(self, exc: argparse.ArgumentError) -> ArgumentProblem:
        """The ArgumentError as data: our own ``_BadValue`` cause, else the argument's choices, else its text."""
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, _BadValue):
            return ArgumentProblem(exc.argument_name, cause.problem, cause.hint)
        action = next((a for a in self._actions if _name(a) == exc.argument_name), None)
        if action is not None and action.choices is not None:   # a subcommand: its choices are its parsers
            return ArgumentProblem(exc.argument_name, "not a known command",
                                   f"use one of: {', '.join(map(str, action.choices))}")
        return ArgumentProblem(exc.argument_name, exc.message, self._fix())

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            raise ArgumentProblem(None, f"unrecognized arguments: {' '.join(extras)}", self._fix())
        return parsed

    def error(self, message: str) -> NoReturn:
        """Anything argparse still reports only as text: one line, exit 2 all the same."""
        raise ArgumentProblem(None, message, self._fix())


def _whole_number(text: str) -> int:
    """``--count``: a whole number (its range is checked with the request)."""
    try:
        return int(text)
    except ValueError:
        raise _BadValue(f"{text!r} is not a whole number", "pass e.g. --count 3") from None


def _one_of(*choices: str) -> Callable[[str], str]:
    """A ``type=`` for an argument that also has ``choices``: a wrong value names them all."""
    def check(text: str) -> str:
        if text not in choices:
            raise _BadValue(f"{text!r} is not a choice", f"use one of: {', '.join(choices)}")
        return text
    return check


class _NotWith(argparse.Action):
    """Store the value unless one of ``others`` (option strings) was given first.

    argparse's mutually exclusive groups say so only in English text; this says
    it as data: the ArgumentError names this option and its cause carries the fix.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, others: Sequence[str] = (),
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.others = tuple(others)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        for other in self.others:
            if getattr(namespace, other.lstrip("-").replace("-", "_"), None) is not None:
                raise argparse.ArgumentError(self, f"not allowed with {other}") from _BadValue(
                    f"not allowed with {other}", f"pass {other} or {option_string}, not both")
        setattr(namespace, self.dest, values)


def _choice(*choices: str) -> dict[str, Any]:
    """``add_argument`` keywords for a value from ``choices`` (listed in --help, named when wrong)."""
    return {"choices": choices, "type": _one_of(*choices)}


def _commands(parser: argparse.ArgumentParser, dest: str, metavar: str) -> argparse._SubParsersAction[_Parser]:
    """``parser``'s subcommands (an unknown one is named by :meth:`_Parser._problem` from their list)."""
    return parser.add_subparsers(dest=dest, required=True, metavar=metavar, parser_class=_Parser)


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


def _load_cfg(path: str) -> PoolConfig:
    from controlplane.config import load_config, with_env_overrides

    return with_env_overrides(load_config(path))


def _pool(args: argparse.Namespace) -> Pool:
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


def _github(cfg: PoolConfig) -> GitHubClient:
    """The GitHub client from the environment, its token proven with one read before any AWS change."""
    from controlplane.github import github_client_for

    gh = github_client_for(cfg.github)
    gh.check_access()
    return gh


def _github_if_set(cfg: PoolConfig) -> GitHubClient | None:
    """As :func:`_github`, but no token means None (the command works without GitHub).

    A token that is set but rejected is still bad input.
    """
    from controlplane.github import github_client_for

    try:
        gh = github_client_for(cfg.github)
    except ConfigError:
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
    res = destroy_pool(cfg, _github_if_set(cfg), progress=Progress(not args.json))
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


def cmd_provision(args: argparse.Namespace) -> int:
    from controlplane.logs import Progress

    run_id = _check_run_id(args.run_id)
    inputs.check_count(args.count, "--count")
    p = _pool(args)                     # the first AWS call (a read), before the provision's own imports
    from controlplane.costtags import parse_cli

    tags = parse_cli(args.tag or [])    # bad tags: exit 2 before any change
    from controlplane.provision import ProvisionRequest, provision

    req = ProvisionRequest(run_id=run_id, resource_class=args.resource_class, count=args.count,
                           usage_class=args.usage_class, tags=tags)
    result = provision(p, req, progress=Progress(not args.json))
    _emit(args, result.to_dict(), lambda: print(result.summary()))
    return 0 if result.ok else 1


def cmd_release(args: argparse.Namespace) -> int:
    from controlplane.logs import Progress

    run_id = _check_run_id(args.run_id)
    p = _pool(args)
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

    res = reconcile(p, dry_run=args.dry_run, github=_github_if_set(p.config),
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
    import gc

    from controlplane.demo import run_demo

    gc.enable()                         # minutes of work: collect cycles as usual (see entry())
    return run_demo(json_output=args.json, state_dir=args.state_dir)


# ------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="runner-pool", description=__doc__.split("\n")[0])
    sub = _commands(ap, "command", "COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str,
            parent: argparse._SubParsersAction[_Parser] = sub) -> _Parser:
        p = parent.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        p.set_defaults(func=fn)
        return p

    def pool_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--pool", action=_NotWith, others=["--config"],
                       help="pool name (reads the config `pool apply` stored); not with --config")
        p.add_argument("--config", action=_NotWith, others=["--pool"], help="pool config file (pool.yaml)")
        p.add_argument("--region", help="AWS region of --pool (default: $AWS_REGION or us-east-1)")

    cfg = _commands(sub.add_parser("config", help="check a pool configuration"), "sub", "SUBCOMMAND")
    p = add("check", cmd_config_check, "validate a pool.yaml; print every problem, exit 2 if any", cfg)
    p.add_argument("file")

    pool = _commands(sub.add_parser("pool", help="apply or destroy a pool without Pulumi"), "sub", "SUBCOMMAND")
    p = add("apply", cmd_pool_apply, "create or update the pool's table, queues, launch template and tokens", pool)
    p.add_argument("--config", required=True)
    p = add("destroy", cmd_pool_destroy, "terminate the pool's instances and remove all its resources", pool)
    pool_args(p)

    local = _commands(sub.add_parser("local", help="the embedded default: local AWS, GitHub stand-in, simulated instances"),
                      "sub", "SUBCOMMAND")
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
    p.add_argument("--usage-class", **_choice("spot", "on-demand"), default=None)
    p.add_argument("--tag", action="append", metavar="KEY=VALUE",
                   help="cost tag on the run's instances while it holds them (a key of the pool's "
                        "run_tag_keys: repository, workflow, team by default); repeatable")

    p = add("release", cmd_release, "give a run's runners back to the pool")
    pool_args(p)
    p.add_argument("--run-id", required=True)

    p = add("refresh", cmd_refresh, "converge template, queues, tokens; terminate expired; reconcile")
    pool_args(p)

    p = add("reconcile", cmd_reconcile, "repair drift between the table, EC2 and GitHub")
    pool_args(p)
    p.add_argument("--dry-run", action="store_true", help="report, change nothing")

    p = add("status", cmd_status, "per class: instances by state, warm minimum, ceiling, interruptions, "
                                  "pool hit rate; queue depths and instances")
    pool_args(p)

    p = sub.add_parser("iam", help="print the IAM policies of a pool as JSON (docs/security.md)",
                       description="print the IAM policies of a pool as JSON (docs/security.md)")
    p.set_defaults(func=cmd_iam)
    p.add_argument("--config", required=True, help="pool config file (pool.yaml)")
    p.add_argument("--account", required=True, help="AWS account id the pool lives in")
    p.add_argument("--partition", **_choice("aws", "aws-cn", "aws-us-gov"), default="aws")
    p.add_argument("--policy", **_choice("control-plane", "pool-admin", "instance"), default=None,
                   help="print only this policy document (default: all three, by name)")
    p.add_argument("--instance-role", default=None,
                   help="role in the pool's instance profile (default: the one createInstanceRole makes)")

    p = add("demo", cmd_demo, "run the whole product on the embedded default, then clean up")
    p.add_argument("--state-dir", type=Path, default=None)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from controlplane import logs

    try:
        args = build_parser().parse_args(argv)
    except ArgumentProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
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


def entry() -> NoReturn:
    """The ``runner-pool`` console script: :func:`main`, started and ended fast.

    A command is a short process that builds a few large, long-lived object
    graphs (botocore's service models, pydantic's schemas) and exits. The
    cyclic garbage collector would walk those graphs again and again while
    they are built, and interpreter shutdown would tear every object down one
    by one before the process ends: together about half a second of CPU per
    command, for memory the operating system takes back at once. So the
    collector is off (``demo`` turns it back on) and, once the command has
    flushed what it printed and logged, the process ends with ``os._exit``.
    No work is cut short by it: every thread the control plane starts is
    joined before its call returns.
    """
    import gc
    import logging

    gc.disable()
    rc = main()
    logging.shutdown()                  # flush the structured log handlers
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe: nothing more can be said
            pass
    os._exit(rc)


if __name__ == "__main__":
    entry()
