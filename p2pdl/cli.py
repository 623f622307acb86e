"""Command line: `python -m p2pdl node|launch|bench …`. The event loop (uvloop) is chosen here."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from p2pdl.config import NodeConfig, Timeouts, parse_address, parse_peers, take_env_secret
from p2pdl.errors import ConfigError, P2PDLError

BENCHMARKS = (
    "kernels",
    "allreduce",
    "schedule",
    "train",
    "scaling",
    "storm",
    "convergence",
    "spark",
)
SECRET_BYTES = 32


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def read_secret(path: str | None) -> bytes | None:
    """The shared secret from --secret-file (not readable by group or others), else from
    P2PDL_SECRET, which is then removed from this process's environment: programs it starts
    do not inherit it."""
    if path:
        try:
            mode = os.stat(path).st_mode
            if mode & 0o077:
                raise ConfigError(
                    f"the secret file {path} is readable by others (mode {mode & 0o777:o}); "
                    f"chmod 600 {path}"
                )
            secret = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the secret file {path}: {exc.strerror}") from None
        if not secret:
            raise ConfigError(f"the secret file {path} is empty")
        return secret  # its strength is checked with every other setting (NodeConfig)
    return take_env_secret()


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _node_parser(sub: Any) -> None:
    node = sub.add_parser(
        "node",
        help="run one node of a cluster (one per host)",
        description="Run one p2pdl node. Static: --rank R --peers h:p,h:p,… ; "
        "rendezvous: --lead --nodes N on one host and --leader host:port on the others.",
    )
    who = node.add_mutually_exclusive_group()
    who.add_argument("--peers", help="host:port of every rank, in rank order (static mode)")
    who.add_argument("--leader", help="host:port of the leader to join")
    who.add_argument("--lead", action="store_true", help="be the leader (rank 0)")
    node.add_argument("--rank", type=int, help="this node's rank (static mode; a wish otherwise)")
    node.add_argument("--nodes", type=int, help="cluster size (with --lead)")
    node.add_argument(
        "--host",
        help="address to listen on (default: the leader's for --lead, the interface that "
        "routes to a remote --leader, else 127.0.0.1)",
    )
    node.add_argument("--port", type=int, help="port to listen on (default 0: any free port)")
    node.add_argument("--secret-file", help="file holding the shared secret (else P2PDL_SECRET)")
    node.add_argument(
        "--insecure",
        action="store_true",
        help="run without a secret: no authentication and no encryption (trusted setups only)",
    )
    node.add_argument(
        "--no-encryption",
        action="store_true",
        help="authenticate but do not encrypt frames (trusted fabrics; every node must agree)",
    )
    node.add_argument("--cluster-id", default="p2pdl", help="name shared by the cluster's nodes")
    node.add_argument("--connect-timeout", type=_positive_float, default=30.0)
    node.add_argument("--op-timeout", type=_positive_float, default=60.0)
    node.add_argument("--run", metavar="MODULE:FUNC", help="run `async FUNC(node)` then exit")
    node.add_argument(
        "--run-args",
        default="{}",
        metavar="JSON",
        help="keyword arguments for the --run function, as a JSON object",
    )
    job = node.add_argument_group("training jobs (group scheduling)")
    job.add_argument(
        "--job",
        metavar="MODULE:ATTR",
        help="with --lead: the job to run; with --leader: the one task this node agrees to run",
    )
    job.add_argument(
        "--allow-task",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="a task a joining node may run for its leader (repeatable); others are refused",
    )
    job.add_argument("--bsp", action="store_true", help="one leader round trip per step")
    job.add_argument(
        "--spec",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="replace a field of the task's job spec (repeatable), e.g. --spec epochs=3",
    )
    job.add_argument("--group-size", default=None, help="steps per group, or 'auto'")
    job.add_argument("--lookahead", type=int, default=None, help="groups pushed ahead")
    job.add_argument("--min-nodes", type=int, help="stop when fewer nodes remain")
    job.add_argument("--checkpoint-dir", help="write boundary snapshots here")
    job.add_argument(
        "--checkpoint-every", type=int, default=None, help="groups between checkpoints (10)"
    )
    job.add_argument("--resume", action="store_true", help="restart from the last checkpoint")
    job.add_argument(
        "--stall-timeout",
        type=_positive_float,
        default=10.0,
        help="seconds without progress before a step is reported to the stall inspector",
    )
    node.set_defaults(handler=_cmd_node)


def _launch_parser(sub: Any) -> None:
    launch = sub.add_parser(
        "launch",
        help="start N local processes of a script with the cluster environment set",
        description="Start N local processes (P2PDL_RANK, P2PDL_WORLD_SIZE, P2PDL_LEADER, "
        "P2PDL_SECRET set), prefix their output with the rank, stop all on the first failure.",
    )
    launch.add_argument("-n", "--nodes", type=int, required=True, help="number of processes")
    launch.add_argument(
        "--grace",
        type=_positive_float,
        default=5.0,
        help="seconds between SIGTERM and SIGKILL when stopping the rest",
    )
    launch.add_argument(
        "--job",
        metavar="MODULE:ATTR",
        help="start a group-scheduled job instead of a script: a leader node and N-1 workers "
        "(the remaining arguments go to the leader node)",
    )
    launch.add_argument(
        "program",
        nargs=argparse.REMAINDER,
        help="script.py args… (or -m module args…); with --job, node options",
    )
    launch.set_defaults(handler=_cmd_launch)


def _bench_parser(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks against peers",
        add_help=True,
        description=f"Benchmarks: {', '.join(BENCHMARKS)}. "
        "`bench NAME --help` lists each one's options.",
    )
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=_cmd_bench)


def _secret_parser(sub: Any) -> None:
    secret = sub.add_parser(
        "secret",
        help="print a fresh 256-bit shared secret",
        description="Print a fresh random 256-bit secret (hex) for P2PDL_SECRET or a "
        "--secret-file (keep that file mode 600).",
    )
    secret.set_defaults(handler=lambda args: print(secrets.token_hex(SECRET_BYTES)) or 0)


def _timeline_parser(sub: Any) -> None:
    tl = sub.add_parser(
        "timeline",
        help="merge a run's P2PDL_TIMELINE parts into one trace, or draw a trace",
        description="`merge TRACE`: write TRACE (Chrome/Perfetto JSON) from the TRACE.part-* "
        "files the ranks wrote (copy them together first when ranks ran on several hosts). "
        "`render TRACE --out PNG`: draw it (one band per rank, one row per kind of work).",
    )
    tl.add_argument("action", choices=["merge", "render"])
    tl.add_argument("trace", help="the trace's path (the value of P2PDL_TIMELINE)")
    tl.add_argument("--out", help="render: the PNG to write (default: TRACE with .png)")
    tl.add_argument("--seconds", type=float, help="render: only the first SECONDS")
    tl.set_defaults(handler=_cmd_timeline)


def _cmd_timeline(args: argparse.Namespace) -> int:
    from p2pdl.collectives import timeline

    if args.action == "merge":
        count = timeline.merge(args.trace)
        if count == 0:
            raise ConfigError(f"no timeline parts next to {args.trace}")
        print(f"{args.trace}: {count} spans")
        return 0
    if not os.path.exists(args.trace):
        raise ConfigError(f"no trace at {args.trace} (merge it first)")
    out = args.out or os.path.splitext(args.trace)[0] + ".png"
    try:
        timeline.render(args.trace, out, width_s=args.seconds)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{args.trace} is not a p2pdl trace: {exc}") from None
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="p2pdl", description="Peer-to-peer data-parallel deep learning.")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("P2PDL_LOG", "WARNING"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _node_parser(sub)
    _launch_parser(sub)
    _bench_parser(sub)
    _secret_parser(sub)
    _timeline_parser(sub)
    return parser


# ------------------------------------------------------------------------------- node
def node_config(args: argparse.Namespace) -> NodeConfig:
    """The node's configuration from its command line (and P2PDL_SECRET)."""
    settings: dict[str, Any] = {
        "secret": read_secret(args.secret_file),
        "cluster_id": args.cluster_id,
        "insecure": args.insecure,
        "encryption": not args.no_encryption,
        "timeouts": Timeouts(connect=args.connect_timeout, operation=args.op_timeout),
        "host": args.host,
        "port": args.port,
    }
    if args.peers:
        if args.rank is None:
            raise ConfigError("--peers needs --rank")
        return NodeConfig(rank=args.rank, peers=parse_peers(args.peers), **settings)
    if args.leader:
        if args.rank == 0:
            raise ConfigError("rank 0 is the leader: use --lead --nodes N")
        return NodeConfig(
            rank=args.rank,
            leader=parse_address(args.leader, "--leader"),
            world_size=args.nodes,
            **settings,
        )
    if args.lead:
        if args.nodes is None or args.nodes < 1:
            raise ConfigError("--lead needs --nodes N (N ≥ 1)")
        if args.rank not in (None, 0):
            raise ConfigError("the leader is rank 0")
        return NodeConfig(world_size=args.nodes, **settings)
    raise ConfigError("give --peers with --rank, --leader host:port, or --lead --nodes N")


JOB_FLAGS = (
    "bsp",
    "group_size",
    "lookahead",
    "min_nodes",
    "checkpoint_dir",
    "checkpoint_every",
    "resume",
    "spec",
)


def _spec_overrides(items: list[str]) -> dict[str, Any]:
    """`--spec FIELD=JSON` values as a mapping (a bare word is a string)."""
    overrides: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--spec must look like FIELD=VALUE, got {item!r}")
        try:
            overrides[name.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[name.strip()] = text
    return overrides


def job_options(args: argparse.Namespace) -> Any:
    """The training settings of `node` (`JobOptions`); leader flags only with --job."""
    from p2pdl.schedule.runtime import JobOptions

    group_size: int | str | None = None
    if args.group_size is not None:
        if args.group_size == "auto":
            group_size = "auto"
        else:
            try:
                group_size = int(args.group_size)
            except ValueError:
                raise ConfigError(
                    f"--group-size must be an integer or 'auto', got {args.group_size!r}"
                ) from None
    values: dict[str, Any] = {
        "job": args.job,
        "allow_tasks": tuple(args.allow_task),
        "bsp": args.bsp,
        "group_size": group_size,
        "min_nodes": args.min_nodes,
        "checkpoint_dir": args.checkpoint_dir,
        "resume": args.resume,
        "stall_timeout": args.stall_timeout,
        "nodes": args.nodes or 1,
        "job_overrides": _spec_overrides(args.spec),
    }
    if args.lookahead is not None:
        values["lookahead"] = args.lookahead
    if args.checkpoint_every is not None:
        values["checkpoint_every"] = args.checkpoint_every
    return JobOptions(**values)


def _check_job_flags(args: argparse.Namespace) -> None:
    """Training flags need a training node: --job (the leader) or a joiner of a job."""
    given = [
        "--" + name.replace("_", "-")
        for name in JOB_FLAGS
        if getattr(args, name) not in (None, False, [])
    ]
    if given and not args.job:
        raise ConfigError(f"{', '.join(given)} only apply to a training job: add --job MODULE:ATTR")


def _resolve(reference: str) -> Any:
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"expected MODULE:NAME, got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{module_name} has no attribute {attr!r}") from None


async def _serve_node(args: argparse.Namespace, config: NodeConfig) -> int:
    from p2pdl.node import Node
    from p2pdl.schedule.runtime import emit

    run = _resolve(args.run) if args.run else None
    try:
        run_args = json.loads(args.run_args)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--run-args is not JSON: {exc}") from None
    if not isinstance(run_args, dict):
        raise ConfigError("--run-args must be a JSON object")
    node = Node(config=config)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda s=signum: stop.done() or stop.set_result(s))
    starting = asyncio.ensure_future(
        node.start(on_listening=lambda a: emit("listening", address=f"{a[0]}:{a[1]}"))
    )
    done, _ = await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
    if starting not in done:
        starting.cancel()
        await node.close()
        return 0
    starting.result()
    try:
        emit(
            "ready",
            rank=node.rank,
            world_size=node.world_size,
            address=f"{node.address[0]}:{node.address[1]}",
        )
        if run is not None:
            work = asyncio.ensure_future(run(node, **run_args))
            done, _ = await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                work.cancel()
                return 0
            result = work.result()
            emit("result", rank=node.rank, value=result)
            return 0
        await stop
        return 0
    finally:
        await node.close()


def _cmd_node(args: argparse.Namespace) -> int:
    """One node: a job's leader (--job), a joiner that follows whatever its leader runs
    (--leader without --run: a job's worker or a plain member), or a plain node."""
    import uvloop

    _check_job_flags(args)
    config = node_config(args)
    if args.job or args.allow_task or (config.mode == "join" and args.run is None):
        from p2pdl.schedule.runtime import run_job_node

        if args.run is not None:
            raise ConfigError("--run and --job exclude each other")
        return uvloop.run(run_job_node(config, job_options(args)))
    return uvloop.run(_serve_node(args, config))


# ----------------------------------------------------------------------------- launch
def _cmd_launch(args: argparse.Namespace) -> int:
    from p2pdl.launch import launch, launch_job

    program = list(args.program)
    if program and program[0] == "--":
        program = program[1:]
    if args.nodes < 1:
        raise ConfigError(f"-n must be at least 1, got {args.nodes}")
    if args.job:
        return launch_job(args.nodes, args.job, program, grace=args.grace)
    if not program:
        raise ConfigError("launch needs a script (script.py args… or -m module args…)")
    return launch(args.nodes, program, grace=args.grace)


# ------------------------------------------------------------------------------ bench
def _cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"p2pdl.bench.{args.name}")
    return int(module.main(list(args.args)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("node", "launch"):
        # Spinning OpenMP workers (Numba's parallel kernels, torch) would take the CPU from
        # the event loop between kernels; nodes wait passively unless the user said otherwise.
        # Benchmarks keep the environment's policy: passive waiting costs the multi-threaded
        # kernels most of their speed-up (measured 1.1x instead of 2.0x on 2 threads).
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"p2pdl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except P2PDLError as exc:
        print(f"p2pdl {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
