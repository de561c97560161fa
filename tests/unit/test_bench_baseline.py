"""`./run bench --baseline REV`: how the baseline revision is found and exported, and how the two are compared.

Against a real git repository made for each test: a revision is resolved to its commit (a name that is no commit,
or looks like an option, is refused), exported once and then reused, and a partial export left by an interrupted
run is discarded, not reused. The lock file chosen is the revision's runtime one. The comparison is current /
baseline per round, printed with its spread, and which revision is measured first alternates. The targets' ports
come from outside the ephemeral range, so no other process's connection takes one between choosing and binding.
(Installing the baseline's venv takes a minute of pip, so it is exercised by running the bench, not here.)
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from baseline_report import merit_ratios, ratio
from processes import BenchError, ephemeral_ports, free_port
from proxy_overhead import alternate
from report import Comparison, RevisionRuns
from revisions import export_tree, resolve, runtime_lock


def git(repository: Path, *args: str) -> str:
    command = ["git", "-C", str(repository), "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """Two commits: `a.txt` is "one" in the first (tagged v1), "two" in the second."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("one")
    git(repo, "add", "a.txt")
    git(repo, "commit", "-q", "-m", "one")
    git(repo, "tag", "v1")
    (repo / "a.txt").write_text("two")
    git(repo, "commit", "-q", "-am", "two")
    return repo


def test_a_revision_resolves_to_its_commit(repository: Path) -> None:
    first = git(repository, "rev-parse", "HEAD~1")
    assert resolve("HEAD~1", repository) == first
    assert resolve("v1", repository) == first
    assert resolve(first[:8], repository) == first
    assert resolve("HEAD", repository) == git(repository, "rev-parse", "HEAD")


@pytest.mark.parametrize("name", ["no-such-branch", "HEAD~5", "HEAD:a.txt", "--output=x", ""])
def test_what_names_no_commit_is_refused(repository: Path, name: str) -> None:
    with pytest.raises(BenchError):
        resolve(name, repository)
    assert not (repository / "x").exists()


def test_the_export_is_the_revisions_files_made_once(repository: Path, tmp_path: Path) -> None:
    sha = resolve("v1", repository)
    folder = tmp_path / "cache" / sha
    folder.mkdir(parents=True)
    tree = export_tree(sha, folder, repository)
    assert (tree / "a.txt").read_text() == "one"  # the revision's, not the working tree's "two"
    (tree / "installed-here").write_text("")  # what the editable install leaves in the tree
    assert export_tree(sha, folder, repository) == tree
    assert (tree / "installed-here").exists()  # reused, not exported again


def test_a_partial_export_is_discarded(repository: Path, tmp_path: Path) -> None:
    sha = resolve("HEAD", repository)
    folder = tmp_path / sha
    (folder / "tree.partial").mkdir(parents=True)
    (folder / "tree.partial" / "left-over").write_text("")
    tree = export_tree(sha, folder, repository)
    assert sorted(p.name for p in tree.iterdir()) == ["a.txt"]
    assert not (folder / "tree.partial").exists()


def test_the_runtime_lock_is_installed(tmp_path: Path) -> None:
    (tmp_path / "requirements-dev.lock").write_text("")
    with pytest.raises(BenchError):
        runtime_lock(tmp_path)  # development tools only: not what the gateway runs on
    (tmp_path / "requirements-runtime.lock").write_text("")
    assert runtime_lock(tmp_path).name == "requirements-runtime.lock"
    (tmp_path / "requirements.lock").write_text("")
    assert runtime_lock(tmp_path).name == "requirements.lock"


def test_a_ratio_is_current_over_baseline_per_round() -> None:
    rps = ratio("req/s", [(110.0, 100.0), (90.0, 100.0), (100.0, 80.0)])
    assert rps is not None
    assert rps.ratios == [1.1, 0.9, 1.25]
    assert rps.median == 1.1
    assert (rps.current, rps.baseline) == (100.0, 100.0)
    assert rps.cell() == "1.100 [0.90-1.25]"
    assert ratio("cpu", [(None, 100.0), (1.0, None)]) is None  # a side not measured gives no ratio


def test_a_figure_of_merit_is_compared_round_by_round() -> None:
    mine = Comparison("gateway / bare", "gateway", "bare", 0.85, "", [0.9, 0.8], [], 0.9)
    theirs = Comparison("gateway / bare", "gateway", "bare", 0.85, "", [0.9, 1.0], [], 1.0)
    (merit,) = merit_ratios([mine], [theirs])
    assert merit.ratios == [1.0, 0.8]


def test_which_revision_goes_first_alternates() -> None:
    assert [list(alternate(["now", "base"], i)) for i in range(3)] == [
        ["now", "base"],
        ["base", "now"],
        ["now", "base"],
    ]
    assert list(alternate(["bare"], 1)) == ["bare"]


def test_listening_ports_are_outside_the_range_anyone_else_draws_from() -> None:
    """A port from bind(0) can be taken by someone's next connection before the target binds it (seen: a gateway
    that lost its port while another answered in its place and the bench measured that one)."""
    ports = [free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    assert not any(port in ephemeral_ports() for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))  # free when handed out


def test_the_microbenchmark_is_the_median_of_its_rounds() -> None:
    rounds = [{"uncached_validate_us": us, "token_bytes": 850, "key": "RSA 2048, RS256"} for us in (90.0, 80.0)]
    assert RevisionRuns(verify=rounds).verify_median() == {
        "uncached_validate_us": 85.0,
        "token_bytes": 850,
        "key": "RSA 2048, RS256",
    }
