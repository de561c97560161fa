"""What the gateway costs on the request path, measured against a bare aiohttp pass-through, in one run.

Targets, all on 127.0.0.1 and all in front of the same fixed-JSON backend (nginx `return 200 '{…}'`):

- nginx direct: the backend alone, the ceiling;
- bare: `bench/bare_proxy.py`, ~30 lines of aiohttp on uvloop (read body, forward with one pooled session,
  stream the answer back), one process;
- gateway: `okta-agent-proxy serve` with a pre-shared-key backend, no `OKTA_ISSUER` (no inbound token
  validation), the production log level INFO (one JSON request line per request), `AUDIT_ENABLED=false`;
- gateway log=WARNING: the same without the request line, so the cost of the request log shows;
- gateway jwt: with `OKTA_ISSUER` (the devkit Okta emulator, `bench/idp.py`) and a valid `Authorization: Bearer`
  on every request: validated, then cached;
- gateway audit=sqlite / audit=postgresql: the gateway with its audit writer on (a SQLite file; a scratch
  database on the PostgreSQL server, created and dropped by the bench);
- gateway sessions (`sessions` part): the jwt gateway in front of a backend that answers every request with its
  `Mcp-Session-Id`; after one `initialize`, every request carries the session id the gateway gave the client
  (`bench/session_load.py`). With `--baseline b6b678e` (the last revision with the in-process binding table) it is the
  cost of sealed session ids (issue 13: >= 0.97);
- gateway cross-app / cross-app redis (`redis` part): the jwt gateway with an `okta-cross-app` backend (ID-JAG and
  access token from the IdP), without and with `REDIS_URL`; after the first request every credential is a cache hit,
  which the gateway's /metrics and the IdP's counters must confirm (`bench/cross_app.py`; issue 13: on/off >= 0.97);
- gateway --workers N (extra line, default N=2; `--workers 0` skips it): N processes on one port, measured in each
  round right beside the one-process gateway (their ratio, with the machine's core count), and compared with the
  one-process bare proxy.

Load comes from wrk (POST, MCP `tools/list` body, a Lua `done` hook printing the numbers). The targets are measured
in `--rounds` interleaved rounds at `-c32` (bare, gateway, the audit targets, jwt, log=WARNING, one after the
other), so drift on the machine hits all of them alike; each figure of merit is the median of per-round ratios:
gateway/bare (issue 2: ≥ 0.85), jwt/bare (issue 3: ≥ 0.8), audit on/off (issue 5: ≥ 0.90, i.e. audit costs at most
10%). Each comparison also shows the ratio of the two targets' best rounds, which a transient slowdown of the
machine (on a shared VM, invisible in steal time) disturbs less. Latency at concurrency 1 gives the added median
latency (issue 2: ≤ 1 ms). The cost of one uncached RS256 verification is measured without the network
(`bench/jwt_verify.py`).

On a machine with 2+ CPUs the proxy under test is pinned to the last CPU and wrk, nginx and the IdP to the others
(`--no-pin` turns this off). Each run also records, from /proc, the CPU time the target spent per request (a cost
measure that other load on the machine disturbs much less than req/s) and how many cores other processes or the
hypervisor took meanwhile; when that is high, the run's req/s is not trustworthy and the bench says so.

The backend checks what it receives on the gateway's route: the caller's `Authorization` must not arrive and the
pre-shared key must. A non-2xx answer there means the gateway forwarded something it must not, or is
misconfigured; the bench then fails. So does an audit target that wrote fewer rows than it served requests, or an
audit-off target that wrote any. Missing the speed targets is reported, not an error.

With `--baseline REV` the gateway of that git revision (exported and installed once under
.cache/bench-baselines/<sha>, see bench/revisions.py) is measured beside this checkout's in the same run: every
gateway target twice, the two revisions one right after the other in each round (which one first alternates), and
the report adds every figure as a ratio, this revision / baseline: the median of the per-round ratios, with their
spread. `--baseline HEAD` compares the code with itself, which shows the noise floor of the machine.

Usage: ./run bench [--parts core,jwt,audit,latency,workers,sessions,redis] [--rounds 3] [--duration 5]
                   [--json out.json] [--baseline REV] [--redis-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from audit_stores import ScratchPostgres, check_audit_rows, create_scratch_databases
from baseline_report import print_baseline_report
from cross_app import check_exchanges, idp_counts, redis_unusable
from processes import HERE, BenchError, Service, ensure_tools, free_port, machine, services, tool_version, wait_ready
from report import AUDIT_DATABASES, ISSUE_ADDED_MS, WORKERS_KEY, RevisionRuns, print_report
from revisions import Revision, current_revision, prepare_baseline
from session_load import describe as describe_session
from session_load import open_session
from targets import GatewayLauncher, Measurer, Target, nginx_config, probe, start_idp, verify_microbench
from wrk_runner import REQUEST_HEADERS, Run, Wrk

PARTS = ("core", "jwt", "audit", "latency", "workers", "sessions", "redis")
IDP_PARTS = {"jwt", "sessions", "redis"}  # parts whose targets validate a caller token from the IdP
DEFAULT_POSTGRES_URL = os.environ.get("OAP_TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
DEFAULT_REDIS_URL = os.environ.get("OAP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
T = TypeVar("T")


@dataclass
class Options:
    duration: float
    latency_duration: float
    warmup: float
    connections: int
    threads: int
    rounds: int
    workers: int
    pin: bool
    parts: tuple[str, ...]
    audit_databases: tuple[str, ...]
    postgres_url: str
    json_path: Path | None
    baseline: str | None = None
    redis_url: str = DEFAULT_REDIS_URL


def _choices(value: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return chosen


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts",
        type=lambda v: _choices(v, PARTS, "part"),
        default=PARTS,
        help="what to measure, comma-separated (default: all of " + ",".join(PARTS) + "). core: nginx direct, bare, "
        "gateway at INFO and WARNING; jwt: gateway with a JWT + the RS256 microbenchmark; audit: audit on/off; "
        "latency: c=1; workers: serve --workers N beside one worker; sessions: every request continues an MCP "
        "session (sealed ids vs --baseline b6b678e's binding table); redis: a cross-app backend's cached credential "
        "with and without REDIS_URL",
    )
    parser.add_argument(
        "--audit-db",
        dest="audit_databases",
        type=lambda v: _choices(v, AUDIT_DATABASES, "database"),
        default=AUDIT_DATABASES,
        help="audit stores for the audit part (default: sqlite,postgresql)",
    )
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="a PostgreSQL database the bench may connect to and create a scratch database from "
        "(default: $OAP_TEST_POSTGRES_URL or postgresql://127.0.0.1:5432/test)",
    )
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="REDIS_URL of the redis part's second target (default: $OAP_TEST_REDIS_URL or redis://127.0.0.1:6379/0; "
        "unreachable: that target is skipped with a warning)",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run (default 5)")
    parser.add_argument("--latency-duration", type=float, default=5.0, help="seconds per c=1 run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per target (default 1)")
    parser.add_argument("--connections", "-c", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", "-t", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument(
        "--rounds", "--pairs", type=int, default=3, help="interleaved rounds over the targets (default 3, min 1)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="N for the workers part: `serve --workers N` (0: skip; default 2)"
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the proxy under test to the last CPU and wrk, nginx and the IdP to the others (pinning "
        "needs >= 2 CPUs and taskset)",
    )
    parser.add_argument("--json", dest="json_path", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        default=None,
        help="also measure the gateway of this git revision (a sha, tag, branch, HEAD~1, ...), interleaved with this "
        "checkout's, and print every figure as a ratio this revision / baseline (latency, workers and the token "
        "microbenchmark then also run --rounds times). The revision is exported and installed with its own lock "
        "file once, under .cache/bench-baselines/<sha>. Many short rounds (--rounds 10 --duration 1) compare best",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.connections < 1 or args.threads < 1 or args.duration < 1:
        parser.error("--rounds, --connections, --threads must be >= 1 and --duration >= 1")
    parts = tuple(p for p in args.parts if p != "workers" or args.workers > 1)
    if not parts:
        parser.error("nothing to measure")
    return Options(
        duration=args.duration,
        latency_duration=args.latency_duration,
        warmup=args.warmup,
        connections=args.connections,
        threads=args.threads,
        rounds=args.rounds,
        workers=args.workers,
        pin=args.pin and shutil.which("taskset") is not None,
        parts=parts,
        audit_databases=args.audit_databases,
        postgres_url=args.postgres_url,
        json_path=args.json_path,
        baseline=args.baseline,
        redis_url=args.redis_url,
    )


def alternate(items: Sequence[T], round_index: int) -> Iterable[T]:
    """`items` in order in even rounds and reversed in odd ones, so neither revision is always measured first."""
    return items if round_index % 2 == 0 else reversed(items)


def measure_verify(revisions: Sequence[Revision], runs: dict[str, RevisionRuns], rounds: int, pin: list[str]) -> None:
    """The token-validation microbenchmark, with each revision's Python and gateway code."""
    print("\nuncached vs cached token validation (bench/jwt_verify.py, no network):", flush=True)
    skipped: set[str] = set()
    for i in range(rounds):
        for revision in alternate(revisions, i):
            if revision.label in skipped:
                continue
            try:
                verify = verify_microbench(revision.python, pin)
            except BenchError as error:
                if not revision.is_baseline:
                    raise
                print(f"bench: warning: the baseline cannot run bench/jwt_verify.py, skipped: {error}", file=sys.stderr)
                skipped.add(revision.label)
                continue
            runs[revision.label].verify.append(verify)
            who = f"{revision.label}: " if len(revisions) > 1 else ""
            print(
                f"  {who}uncached validate {verify['uncached_validate_us']:.0f} us/op (jwt.decode RS256 alone "
                f"{verify['jwt_decode_rs256_us']:.0f} us), cached validate {verify['cached_validate_us']:.1f} us/op",
                flush=True,
            )


def measure_workers(
    options: Options,
    gateways: Sequence[Target],
    gateway: Sequence[Target],
    both: Callable[..., list[Target]],
    measurer: Measurer,
    by_revision: dict[str, RevisionRuns],
    rounds: int,
    compared: bool,
) -> None:
    """`serve --workers N` of each revision beside its one-process gateway, one right after the other in each round
    (which goes first alternates), so their ratio is taken at one moment of the machine's speed."""
    kept = {id(target) for target in gateway}
    for target in gateways:
        if id(target) not in kept:
            target.service.stop()  # idle event loops would otherwise share the cores with the workers
    n = options.workers
    print(f"\nextra: gateway --workers {n} beside the one-process gateway (the bare proxy is one process)", flush=True)
    workers = both(f"gateway --workers {n}", workers=n)
    for target in workers:
        wait_ready(target.service, target.ready_url)
        probe(target.service, target.url, target.headers)
    for target in [*gateway, *workers]:
        measurer.warm(target)
    pairs = list(zip(gateway, workers, strict=True))
    for i in range(rounds):
        mark = f" #{i + 1}" if compared else ""
        for single, many in alternate(pairs, i):
            entry: dict[str, Run] = {}
            for target, key in alternate([(single, "gateway"), (many, WORKERS_KEY)], i):
                label = f"{target.name} (1 worker){mark}" if key == "gateway" else f"{target.name}{mark}"
                entry[key] = measurer.measure(target, options.connections, options.duration, label)
            by_revision["baseline" if single.baseline else "current"].worker_rounds.append(entry)


def bench(options: Options) -> dict[str, Any]:
    parts = set(options.parts)
    wrk_path, nginx_path = ensure_tools()
    revisions = [current_revision()]
    if options.baseline is not None:
        revisions.append(prepare_baseline(options.baseline))
    compared = len(revisions) > 1
    extra_rounds = options.rounds if compared else 1  # latency, workers, microbenchmark: once without a baseline
    info = machine()
    info["wrk"] = tool_version([wrk_path, "-v"]).split(" [")[0].replace("debian/", "").removeprefix("wrk ")
    info["nginx"] = tool_version([nginx_path, "-v"]).removeprefix("nginx version: nginx/")
    for revision in revisions[1:]:
        facts = ", ".join(f"{k} {v}" for k, v in revision.facts.items() if k != "source")
        info["baseline"] = f"{revision.describe} ({facts})"

    # On a small machine wrk, nginx and the proxy fight for the cores and the scheduler moves them around, which
    # makes runs noisy. Pinned, the proxy under test owns one CPU and the load generator and backend share the rest.
    cpus = sorted(os.sched_getaffinity(0))
    pin = options.pin and len(cpus) >= 2
    load_cpus, proxy_cpu = ",".join(map(str, cpus[:-1])), str(cpus[-1])
    load_pin = ["taskset", "-c", load_cpus] if pin else []
    proxy_pin = ["taskset", "-c", proxy_cpu] if pin else []
    info["pinning"] = (
        f"proxy under test on CPU {proxy_cpu}, wrk, nginx and the IdP on CPU {load_cpus}" if pin else "none"
    )
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    by_revision = {revision.label: RevisionRuns() for revision in revisions}
    if "jwt" in parts:
        measure_verify(revisions, by_revision, extra_rounds, proxy_pin)

    postgres: dict[str, ScratchPostgres] = {}
    audit_databases = list(options.audit_databases) if "audit" in parts else []
    if "postgresql" in audit_databases:
        postgres = create_scratch_databases(options.postgres_url, [r.label for r in revisions]) or {}
        if not postgres:
            audit_databases.remove("postgresql")

    round_runs: list[Run] = []
    try:
        with tempfile.TemporaryDirectory(prefix="oap-bench-") as tmp, services() as started:
            workdir = Path(tmp)
            measurer = Measurer(Wrk(wrk_path, options.threads, load_pin), started, options.warmup)
            measure = measurer.measure

            # The IdP, for the targets with a caller token; first, so the backend can refuse that token.
            idp_facts = start_idp(workdir, started, load_pin) if parts & IDP_PARTS else None

            # The backend.
            nginx_port = free_port()
            caller_token = idp_facts["token"] if idp_facts is not None else None
            (workdir / "nginx.conf").write_text(nginx_config(workdir, nginx_port, caller_token))
            nginx_command = [*load_pin, nginx_path, "-p", str(workdir), "-c", str(workdir / "nginx.conf")]
            nginx = Service("nginx", [*nginx_command, "-e", str(workdir / "nginx-error.log")], workdir)
            started.append(nginx)
            nginx_url = f"http://127.0.0.1:{nginx_port}"
            wait_ready(nginx, nginx_url + "/")
            probe(nginx, nginx_url + "/mcp", REQUEST_HEADERS)
            launcher = GatewayLauncher(workdir, started, nginx_port, proxy_pin, postgres)
            direct = Target("nginx direct", nginx, nginx_url + "/mcp", launcher.plain_script, REQUEST_HEADERS)

            # The proxies under test, started together, then checked one by one. A slot holds one target, or a
            # gateway target and its baseline twin.
            bare: Target | None = None
            if parts & {"core", "jwt", "latency", "sessions"}:
                bare_port = free_port()
                bare_command = [sys.executable, str(HERE / "bare_proxy.py"), str(bare_port), nginx_url]
                bare_service = Service("bare", [*proxy_pin, *bare_command], workdir)
                started.append(bare_service)
                bare_url = f"http://127.0.0.1:{bare_port}"
                bare = Target("bare", bare_service, bare_url + "/mcp", launcher.plain_script, REQUEST_HEADERS)
                bare.ready_url = bare_url + "/"

            def both(key: str, **kwargs: Any) -> list[Target]:
                return [launcher.start(key, revision, **kwargs) for revision in revisions]

            gateway = both("gateway") if parts & {"core", "audit", "latency", "workers"} else []
            audit_targets = [both(f"gateway audit={db}", audit=db) for db in audit_databases]
            jwt_target = both("gateway jwt", idp=idp_facts) if "jwt" in parts else []
            quiet = both("gateway log=WARNING", log_level="WARNING") if "core" in parts else []
            session_target = both("gateway sessions", idp=idp_facts, backend="sessions") if "sessions" in parts else []
            cross_app = both("gateway cross-app", idp=idp_facts, backend="cross-app") if "redis" in parts else []
            cross_app_redis: list[Target] = []
            if "redis" in parts:
                unusable = redis_unusable(options.redis_url)
                if unusable is None:
                    cross_app_redis = both(
                        "gateway cross-app redis", idp=idp_facts, backend="cross-app", redis_url=options.redis_url
                    )
                else:
                    print(
                        f"bench: warning: Redis at {options.redis_url} is not usable ({unusable}); skipping the "
                        "REDIS_URL target",
                        file=sys.stderr,
                    )
            gateways = [
                t
                for slot in (gateway, *audit_targets, jwt_target, quiet, session_target, cross_app, cross_app_redis)
                for t in slot
            ]
            for target in ([bare] if bare is not None else []) + gateways:
                wait_ready(target.service, target.ready_url)
                probe(target.service, target.url, target.headers)
            notes: list[str] = []
            for target in session_target:
                session = open_session(target, workdir)
                notes.append(f"{target.name}: the client's Mcp-Session-Id is {describe_session(session)}")
            exchanges_before = None
            if idp_facts is not None and cross_app:
                exchanges_before = idp_counts(idp_facts["counts_url"])  # the probes made each gateway exchange once

            # Targets whose requests carry more than the plain one (an ~850-byte token; a session id) are compared
            # with the bare proxy sent the same requests, so a ratio measures what the gateway adds, not what
            # receiving a bigger request costs any proxy.
            bare_jwt = bare_sessions = None
            if bare is not None and jwt_target:
                jwt_script, jwt_headers = jwt_target[0].script, jwt_target[0].headers
                bare_jwt = Target("bare jwt-request", bare.service, bare.url, jwt_script, jwt_headers)
            if bare is not None and session_target:
                session_script, session_headers = session_target[0].script, session_target[0].headers
                bare_sessions = Target("bare session-request", bare.service, bare.url, session_script, session_headers)

            c = options.connections
            slots = [[bare]] if bare is not None and parts & {"core", "jwt"} else []
            slots += [[t] for t in (bare_jwt, bare_sessions) if t is not None]
            slots += [gateway] if gateway and ("core" in parts or audit_targets) else []
            slots += [s for s in (*audit_targets, jwt_target, quiet, session_target, cross_app, cross_app_redis) if s]
            print(f"\nthroughput: wrk -t{options.threads} -c{c} -d{options.duration:g}s, POST tools/list", flush=True)
            if "core" in parts:
                measurer.warm(direct)
                measure(direct, c, options.duration)
            for slot in slots:
                for target in slot:
                    measurer.warm(target)
            for i in range(options.rounds):
                for runs in by_revision.values():
                    runs.rounds.append({})
                for slot in slots:
                    for target in alternate(slot, i):
                        run = measure(target, c, options.duration, f"{target.name} #{i + 1}")
                        round_runs.append(run)
                        for label, runs in by_revision.items():
                            if len(slot) == 1 or target.baseline == (label == "baseline"):
                                runs.rounds[-1][target.key] = run
            if exchanges_before is not None and idp_facts is not None:
                exchanges_after = idp_counts(idp_facts["counts_url"])
                notes += check_exchanges(exchanges_before, exchanges_after, cross_app + cross_app_redis)

            if "latency" in parts and bare is not None and gateway:
                print(f"\nlatency: wrk -t1 -c1 -d{options.latency_duration:g}s", flush=True)
                for i in range(extra_rounds):
                    mark = f" #{i + 1}" if compared else ""
                    bare_c1 = measure(bare, 1, options.latency_duration, f"bare c=1{mark}")
                    for target in alternate(gateway, i):
                        run = measure(target, 1, options.latency_duration, f"{target.name} c=1{mark}")
                        by_revision["baseline" if target.baseline else "current"].latency.append((bare_c1, run))

            # Audit checks: every request served with audit on left a row (none dropped); audit off wrote none.
            audit_rows: dict[str, int] = {}
            if audit_targets:
                audit_rows = check_audit_rows([t for slot in (*audit_targets, gateway) for t in slot])
            drops = {t.name: sum(r.audit_dropped or 0 for r in t.runs) for slot in audit_targets for t in slot}

            if "workers" in parts:
                measure_workers(options, gateways, gateway, both, measurer, by_revision, extra_rounds, compared)
    finally:
        for database in postgres.values():
            database.drop()

    current = by_revision["current"]
    direct_run = direct.runs[0] if direct.runs else None
    found = print_report(
        info, measurer.runs, round_runs, current, direct_run, audit_rows, drops, options.workers, notes
    )
    result = {
        "machine": info,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "runs": [asdict(run) for run in measurer.runs],
        "comparisons": [comparison.as_dict() for comparison in found],
        "added_median_latency_ms_c1": current.added_ms(),
        "added_ms_max": ISSUE_ADDED_MS,
        "token_validation": current.verify_median(),
        "audit_rows": audit_rows,
        "audit_dropped": drops,
        "checks": notes,
    }
    if compared:
        baseline = revisions[1]
        busy = max([max(r.busy_elsewhere_cores or 0.0, r.steal_cores or 0.0) for r in round_runs], default=None)
        comparison = print_baseline_report(
            current, by_revision["baseline"], revisions[0].describe, baseline.describe, options.workers, busy
        )
        result["baseline"] = {"revision": baseline.describe, **baseline.facts, **comparison}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        result = bench(options)
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {options.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
