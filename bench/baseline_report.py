"""This revision against a baseline revision: every gateway figure as a ratio, current / baseline.

Both revisions' gateways run in the same bench, in the same rounds, one right after the other (which goes first
alternates from round to round, so a drift of the machine's speed within a round favours neither). Each figure is
the median of the per-round ratios, printed with their spread (lowest–highest): with so few rounds the spread, not
a test, says whether a difference is more than noise, and `--baseline HEAD` (the same code on both sides) shows the
machine's noise floor. For req/s a ratio above 1 is faster; for CPU per request and latency, below 1 is cheaper.
No verdict is printed: on a shared 2-core VM, three rounds of the same code on both sides can all land on one side
of 1 by several %.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from report import NOISY_CORES, SESSIONS_RATIO, Comparison, RevisionRuns, figures_of_merit, workers_comparison
from wrk_runner import Run

VERIFY_FIGURES = {
    "uncached_validate_us": "token validation, uncached",
    "jwt_decode_rs256_us": "jwt.decode RS256 alone",
    "cached_validate_us": "token validation, cached",
}
GATEWAY_KEYS = (
    "gateway",
    "gateway log=WARNING",
    "gateway jwt",
    "gateway audit=sqlite",
    "gateway audit=postgresql",
    "gateway sessions",
    "gateway cross-app",
    "gateway cross-app redis",
)
SESSIONS_KEY = "gateway sessions"


@dataclass
class Ratio:
    """current / baseline for one figure: the medians of each side and of the per-round ratios, and their spread."""

    figure: str
    current: float
    baseline: float
    ratios: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def cell(self) -> str:
        return f"{self.median:.3f} [{min(self.ratios):.2f}-{max(self.ratios):.2f}]"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "median": self.median, "min": min(self.ratios), "max": max(self.ratios)}


def ratio(figure: str, pairs: Sequence[tuple[float | None, float | None]]) -> Ratio | None:
    """Per-round ratios of the pairs (current, baseline) where both sides were measured."""
    usable = [(c, b) for c, b in pairs if c is not None and b is not None and b > 0]
    if not usable:
        return None
    return Ratio(
        figure,
        round(statistics.median(c for c, _ in usable), 3),
        round(statistics.median(b for _, b in usable), 3),
        [round(c / b, 3) for c, b in usable],
    )


def run_ratios(name: str, pairs: Sequence[tuple[Run, Run]]) -> dict[str, Ratio]:
    """req/s, CPU per request, p50 and p99 of one target, current against baseline."""
    figures: dict[str, Callable[[Run], float | None]] = {
        "req/s": lambda r: r.rps,
        "cpu us/req": lambda r: r.cpu_us_per_request,
        "p50 ms": lambda r: r.p50_ms,
        "p99 ms": lambda r: r.p99_ms,
    }
    found = {}
    for figure, value in figures.items():
        found[figure] = ratio(f"{name} {figure}", [(value(c), value(b)) for c, b in pairs])
    return {k: v for k, v in found.items() if v is not None}


def others_cores(pairs: Sequence[tuple[Run, Run]]) -> float | None:
    """The most cores other processes and the hypervisor took during any of these runs."""
    known = [(r.busy_elsewhere_cores or 0.0) + (r.steal_cores or 0.0) for pair in pairs for r in pair]
    return round(max(known), 2) if known else None


def target_pairs(current: RevisionRuns, baseline: RevisionRuns, workers: int) -> dict[str, list[tuple[Run, Run]]]:
    """Per gateway target, its (current, baseline) runs round by round."""
    rounds = list(zip(current.rounds, baseline.rounds, strict=False))
    found: dict[str, list[tuple[Run, Run]]] = {}
    for key in GATEWAY_KEYS:
        pairs = [(c[key], b[key]) for c, b in rounds if key in c and key in b]
        if pairs:
            found[key] = pairs
    if current.latency and baseline.latency:
        found["gateway c=1"] = [(c, b) for (_, c), (_, b) in zip(current.latency, baseline.latency, strict=False)]
    worker_rounds = list(zip(current.worker_rounds, baseline.worker_rounds, strict=False))
    single = [(c["gateway"], b["gateway"]) for c, b in worker_rounds if "gateway" in c and "gateway" in b]
    if single:
        found["gateway (workers part)"] = single
    if current.workers and baseline.workers:
        found[f"gateway --workers {workers}"] = list(zip(current.workers, baseline.workers, strict=False))
    return found


def merit_ratios(current: Sequence[Comparison], baseline: Sequence[Comparison]) -> list[Ratio]:
    """Each figure of merit (gateway / bare, audit on / off, …): its per-round value, current over baseline."""
    by_label = {comparison.label: comparison for comparison in baseline}
    found = []
    for mine in current:
        theirs = by_label.get(mine.label)
        if theirs is not None:
            pairs = list(zip(mine.ratios, theirs.ratios, strict=False))
            found.append(Ratio(mine.label, mine.median, theirs.median, [round(c / b, 3) for c, b in pairs]))
    return found


def verify_ratios(current: RevisionRuns, baseline: RevisionRuns) -> list[Ratio]:
    pairs = list(zip(current.verify, baseline.verify, strict=False))
    found = []
    for key, figure in VERIFY_FIGURES.items():
        value = ratio(figure, [(c.get(key), b.get(key)) for c, b in pairs])
        if value is not None:
            found.append(value)
    return found


def print_baseline_report(
    current: RevisionRuns,
    baseline: RevisionRuns,
    current_name: str,
    baseline_name: str,
    workers: int,
    busy_cores: float | None,
) -> dict[str, Any]:
    """Prints the comparison; returns it for the JSON file. `busy_cores`: the most other work took in a round."""
    pairs = target_pairs(current, baseline, workers)
    targets = {name: run_ratios(name, runs) for name, runs in pairs.items()}
    mine, theirs = figures_of_merit(current.rounds), figures_of_merit(baseline.rounds)
    mine += [c for c in (workers_comparison(current.worker_rounds, workers),) if c is not None]
    theirs += [c for c in (workers_comparison(baseline.worker_rounds, workers),) if c is not None]
    merits = merit_ratios(mine, theirs)
    verify = verify_ratios(current, baseline)
    if current_name.endswith("-dirty"):
        current_name += ": the working tree, with changes not committed"
    print(f"\n== this revision ({current_name}) / baseline ({baseline_name})")
    print(
        "median of the per-round ratios [lowest-highest]. req/s: above 1 is faster; cpu us/req, p50, p99: below 1 is "
        "cheaper.\nThe same code on both sides (--baseline HEAD) shows how far from 1 noise alone takes a ratio here."
    )
    header = f"{'target':<26} {'req/s now':>9} {'base':>6}  {'req/s ratio':<19} {'cpu us/req ratio':<19} "
    header += f"{'p50 ratio':<19} {'p99 ratio':<19} {'others':>6}"
    print(header)
    print("-" * len(header))
    for name, figures in targets.items():
        rps = figures.get("req/s")
        cells = [figures[f].cell() if f in figures else "-" for f in ("req/s", "cpu us/req", "p50 ms", "p99 ms")]
        now, base = (f"{rps.current:.0f}", f"{rps.baseline:.0f}") if rps else ("-", "-")
        others = others_cores(pairs[name])
        print(
            f"{name:<26} {now:>9} {base:>6}  "
            + " ".join(f"{cell:<19}" for cell in cells)
            + f" {'-' if others is None else format(others, '.2f'):>6}"
        )
    print("others: the most cores other processes and the hypervisor took during one of the target's runs")
    if merits:
        print(f"\n{'figure of merit':<38} {'now':>6} {'base':>6}  ratio (per round: now / base)")
        for merit in merits:
            print(f"{merit.figure:<38} {merit.current:>6.3f} {merit.baseline:>6.3f}  {merit.cell()}")
    added_now, added_base = current.added_ms(), baseline.added_ms()
    if added_now is not None and added_base is not None:
        print(f"added median latency at c=1: now {added_now:+.3f} ms, baseline {added_base:+.3f} ms")
    for value in verify:
        print(f"{value.figure}: now {value.current:.1f} us, baseline {value.baseline:.1f} us; {value.cell()}")
    sessions = targets.get(SESSIONS_KEY, {}).get("req/s")
    if sessions is not None:
        print(
            f"{SESSIONS_KEY}, req/s this revision / baseline: {sessions.cell()} (issue 13 asks >= {SESSIONS_RATIO:g} "
            "for sealed session ids against the binding table of b6b678e; the spread shows the noise)"
        )
    if busy_cores is not None and busy_cores > NOISY_CORES:
        print(
            f"warning: other work took up to {busy_cores:.2f} cores during the rounds: differences of several % "
            "are noise here; rerun on a quiet machine or with more --rounds"
        )
    return {
        "targets": {
            name: {**{k: v.as_dict() for k, v in figures.items()}, "others_cores_max": others_cores(pairs[name])}
            for name, figures in targets.items()
        },
        "figures_of_merit": [merit.as_dict() for merit in merits],
        "added_median_latency_ms_c1": {"current": added_now, "baseline": added_base},
        "token_validation": [value.as_dict() for value in verify],
    }
