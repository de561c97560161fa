"""The bench's report: the table of every run, the figures of merit as medians of per-round ratios, the checks.

Targets are measured in interleaved rounds, so a change in the machine's speed hits every target of a round alike;
each figure of merit is therefore the median of the ratios taken within each round, printed with the ratios
themselves, the same ratio by CPU per request, and the ratio of the two targets' best rounds (which a transient
slowdown of a shared VM, invisible in steal time, disturbs less). Missing a speed target is reported, not an error.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from wrk_runner import Run, ms, optional

CORE_RATIO = 0.85  # issue 2: gateway / bare req/s
JWT_RATIO = 0.8  # issue 3: gateway with a JWT on every request / bare
AUDIT_RATIO = 0.9  # issue 5: audit on / audit off (audit costs at most 10%)
ISSUE_ADDED_MS = 1.0  # issue 2: added median latency at c=1
REDIS_RATIO = 0.97  # issue 13: cross-app credential cache hits with REDIS_URL / without
SESSIONS_RATIO = 0.97  # issue 13: sealed session ids / the in-process binding table (this revision / b6b678e)
WORKERS_KEY = "gateway --workers"  # in a workers round, beside "gateway": the one-process gateway
NOISY_CORES = 0.2  # other work on the machine above this (in cores) makes a run's req/s unreliable
AUDIT_DATABASES = ("sqlite", "postgresql")


@dataclass
class RevisionRuns:
    """One revision's runs by target key (the bare proxy's and nginx's are shared by both revisions)."""

    rounds: list[dict[str, Run]] = field(default_factory=list)  # per round: target key -> run
    latency: list[tuple[Run, Run]] = field(default_factory=list)  # per c=1 round: (bare, gateway)
    # Per workers round: `serve --workers N` (WORKERS_KEY) and the one-process gateway ("gateway"), one right
    # after the other.
    worker_rounds: list[dict[str, Run]] = field(default_factory=list)
    verify: list[dict[str, Any]] = field(default_factory=list)  # bench/jwt_verify.py's figures, one per round

    @property
    def workers(self) -> list[Run]:
        """The `serve --workers N` runs, one per workers round."""
        return [r[WORKERS_KEY] for r in self.worker_rounds if WORKERS_KEY in r]

    def added_ms(self) -> float | None:
        """Gateway p50 − bare p50 at c=1, the median over the latency rounds."""
        if not self.latency:
            return None
        return round(statistics.median(g.p50_ms - b.p50_ms for b, g in self.latency), 3)

    def verify_median(self) -> dict[str, Any] | None:
        """The microbenchmark's figures, each the median over the rounds (descriptions as the first round's)."""
        if not self.verify:
            return None
        first = self.verify[0]
        return {
            k: statistics.median(v[k] for v in self.verify) if isinstance(first[k], int | float) else first[k]
            for k in first
        }


@dataclass
class Comparison:
    """The per-round ratios of `numerator` to `denominator` (req/s, and the inverse ratio of CPU per request)."""

    label: str
    numerator: str
    denominator: str
    target: float | None
    issue: str
    ratios: list[float]
    cpu_ratios: list[float]
    best: float  # the best req/s of the numerator over the best of the denominator, across the rounds

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.median >= self.target

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "numerator": self.numerator,
            "denominator": self.denominator,
            "issue": self.issue,
            "target_min": self.target,
            "ratios": self.ratios,
            "median": self.median,
            "cpu_ratios": self.cpu_ratios,
            "median_cpu": statistics.median(self.cpu_ratios) if self.cpu_ratios else None,
            "best_of_rounds": self.best,
            "met": self.met,
        }


def compare(
    rounds: Sequence[dict[str, Run]], label: str, num: str, den: str, target: float | None, issue: str
) -> Comparison | None:
    pairs = [(r[num], r[den]) for r in rounds if num in r and den in r]
    if not pairs:
        return None
    ratios = [round(n.rps / d.rps, 3) for n, d in pairs]
    cpu = [
        round(d.cpu_us_per_request / n.cpu_us_per_request, 3)
        for n, d in pairs
        if n.cpu_us_per_request and d.cpu_us_per_request
    ]
    best = round(max(n.rps for n, _ in pairs) / max(d.rps for _, d in pairs), 3)
    return Comparison(label, num, den, target, issue, ratios, cpu, best)


def figures_of_merit(rounds: Sequence[dict[str, Run]]) -> list[Comparison]:
    comparisons = [
        compare(rounds, "gateway / bare", "gateway", "bare", CORE_RATIO, "issue 2"),
        compare(rounds, "gateway log=WARNING / bare", "gateway log=WARNING", "bare", None, ""),
        compare(rounds, "gateway / gateway log=WARNING", "gateway", "gateway log=WARNING", None, "request log"),
        compare(rounds, "gateway jwt / bare (same request)", "gateway jwt", "bare jwt-request", JWT_RATIO, "issue 3"),
        compare(rounds, "gateway jwt / bare", "gateway jwt", "bare", None, ""),
        *(
            compare(rounds, f"audit={db} on / off", f"gateway audit={db}", "gateway", AUDIT_RATIO, "issue 5")
            for db in AUDIT_DATABASES
        ),
        compare(rounds, "gateway sessions / bare (same request)", "gateway sessions", "bare session-request", None, ""),
        compare(rounds, "gateway sessions / gateway jwt", "gateway sessions", "gateway jwt", None, "session cost"),
        compare(
            rounds,
            "cross-app REDIS_URL on / off",
            "gateway cross-app redis",
            "gateway cross-app",
            REDIS_RATIO,
            "issue 13",
        ),
    ]
    return [comparison for comparison in comparisons if comparison is not None]


def workers_comparison(worker_rounds: Sequence[dict[str, Run]], workers: int) -> Comparison | None:
    """`serve --workers N` over the one-process gateway measured right beside it, round by round."""
    return compare(worker_rounds, f"gateway --workers {workers} / 1 worker", WORKERS_KEY, "gateway", None, "")


def print_comparison(comparison: Comparison, note: str = "") -> None:
    goal = ""
    if comparison.target is not None:
        verdict = "met" if comparison.met else "NOT met"
        goal = f"  ({comparison.issue} target >= {comparison.target:g}: {verdict})"
    cpu = f"; by CPU per request {statistics.median(comparison.cpu_ratios):.3f}" if comparison.cpu_ratios else ""
    print(
        f"{comparison.label:<38} per round {', '.join(f'{r:.3f}' for r in comparison.ratios)}"
        f" -> median {comparison.median:.3f}{cpu}; best of rounds {comparison.best:.3f}{goal}{note}"
    )


def print_table(runs: Sequence[Run]) -> None:
    width = max([28, *(len(run.target) for run in runs)])
    header = (
        f"{'target':<{width}} {'conns':>5} {'req/s':>8} {'p50':>9} {'p99':>9} {'non-2xx':>7} {'sockerr':>7} "
        f"{'cpu us/req':>10} {'elsewhere':>9} {'steal':>5}"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        errors = sum(run.socket_errors.values())
        print(
            f"{run.target:<{width}} {run.connections:>5} {run.rps:>8.0f} {ms(run.p50_ms):>9} {ms(run.p99_ms):>9} "
            f"{run.non_2xx:>7} {errors:>7} {optional(run.cpu_us_per_request, '.0f'):>10} "
            f"{optional(run.busy_elsewhere_cores, '.2f'):>9} {optional(run.steal_cores, '.2f'):>5}"
        )
    print(
        "cpu us/req: CPU time of the target's processes per request served. elsewhere / steal: CPU cores busy "
        "meanwhile\nwith processes outside this bench / taken by the hypervisor (both should be ~0 for clean figures)."
    )


def print_report(
    info: dict[str, Any],
    runs: Sequence[Run],
    round_runs: Sequence[Run],
    current: RevisionRuns,
    direct: Run | None,
    audit_rows: dict[str, int],
    drops: dict[str, int],
    workers: int,
    notes: Sequence[str] = (),
) -> list[Comparison]:
    """The report of the current revision (`round_runs`: the throughput rounds' runs, of every revision; `notes`:
    what the parts' checks found, printed last)."""
    found = figures_of_merit(current.rounds)
    busy = [r.busy_elsewhere_cores for r in round_runs if r.busy_elsewhere_cores is not None]
    busy += [r.steal_cores for r in round_runs if r.steal_cores is not None]

    print("\n== results (" + ", ".join(f"{k} {v}" for k, v in info.items()) + ")")
    print_table(runs)
    print()
    for comparison in found:
        print_comparison(comparison)
    if busy and max(busy) > NOISY_CORES:
        print(
            f"warning: other work took up to {max(busy):.2f} cores during the rounds (see elsewhere/steal): req/s "
            "figures are noisy; rerun on a quiet machine or with more --rounds"
        )
    if any(drops.values()):
        print(f"warning: the audit writer dropped events (queue full): {drops}")
    if audit_rows:
        print("audit rows written: " + ", ".join(f"{name} {rows}" for name, rows in audit_rows.items()))
    rounds = current.rounds
    median_bare = statistics.median(r["bare"].rps for r in rounds) if rounds and "bare" in rounds[0] else None
    if median_bare and direct is not None:
        print(f"bare / nginx direct req/s: {median_bare / direct.rps:.3f}")
    added_ms = current.added_ms()
    if added_ms is not None:
        bare_p50 = statistics.median(b.p50_ms for b, _ in current.latency)
        gateway_p50 = statistics.median(g.p50_ms for _, g in current.latency)
        verdict = "met" if added_ms <= ISSUE_ADDED_MS else "NOT met"
        print(
            f"added median latency at c=1: {added_ms:+.3f} ms  (gateway p50 {gateway_p50:.3f} ms - bare p50 "
            f"{bare_p50:.3f} ms; issue 2 target <= {ISSUE_ADDED_MS:g} ms: {verdict})"
        )
    verify = current.verify_median()
    if verify is not None:
        print(
            f"token validation: uncached {verify['uncached_validate_us']:.0f} us/op (RS256 jwt.decode alone "
            f"{verify['jwt_decode_rs256_us']:.0f} us), cached {verify['cached_validate_us']:.1f} us/op"
        )
    per_worker = workers_comparison(current.worker_rounds, workers)
    if per_worker is not None:
        cpus = sorted(os.sched_getaffinity(0))
        print(
            f"cores: os.cpu_count() {os.cpu_count()}, affinity {len(cpus)} CPUs ({','.join(map(str, cpus))}); the "
            f"{workers} workers are not pinned and share them with wrk and nginx; the one-worker gateway: "
            f"{info.get('pinning', 'none')}"
        )
        print_comparison(per_worker)
        found.append(per_worker)
    if current.workers and median_bare:
        rps = statistics.median(run.rps for run in current.workers)
        print(
            f"gateway --workers {workers}: {rps:.0f} req/s = {rps / median_bare:.3f}x "
            f"the median bare run (bare is one process; wrk and nginx share the same {info['cores']} cores)"
        )
    for note in notes:
        print(note)
    return found
