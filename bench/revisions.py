"""The gateway revisions a run measures: this checkout, and with `--baseline REV` that git revision beside it.

A baseline is exported with `git archive` (no worktree, nothing in this repository's git state changes) into
`.cache/bench-baselines/<sha>/tree` and gets a virtualenv of its own in `.cache/bench-baselines/<sha>/venv`,
installed from that revision's own lock file and then `pip install --no-deps -e` of the exported tree, so the
baseline gateway runs its own code on its own pinned dependencies. Both are made once per commit and reused: the
export is unpacked into a scratch folder and renamed into place only when complete, the venv is marked installed
only after pip succeeded (an interrupted install is redone from scratch), and a file lock keeps two benches from
preparing the same commit at once.

Everything else — wrk, nginx, the IdP, the bare proxy, the checks — is this checkout's, for both revisions: only the
gateway under test differs. Before any load, `Revision.source` (where that Python imports `okta_agent_proxy`
from) is checked to be the revision's own tree, so a mix-up cannot pass as a comparison.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from processes import HERE, BenchError, git_describe

REPOSITORY = HERE.parent
CACHE = REPOSITORY / ".cache" / "bench-baselines"
RUNTIME_LOCK = "requirements.lock"  # the packages a revision runs on; whatever else it pins is only installed too
INSTALL_SECONDS = 900
BASELINE_MARK = " [base]"  # appended to the names of the baseline's targets

# Run with the revision's Python: where it imports the gateway from, and the versions that matter to the figures.
_FACTS = """
import importlib.metadata as m, json, platform, okta_agent_proxy
def v(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "?"
print(json.dumps({"source": okta_agent_proxy.__file__, "python": platform.python_version(),
                  **{name: v(name) for name in ("okta-agent-proxy", "aiohttp", "uvloop")}}))
"""


@dataclass(frozen=True)
class Revision:
    """A gateway to measure: its git revision, the Python it runs on and its `okta-agent-proxy` command."""

    label: str  # "current" or "baseline"
    describe: str  # `git describe`, with "-dirty" for a working tree with changes
    python: Path
    gateway: Path
    mark: str  # appended to the names of this revision's targets ("" for the current one)
    tree: Path  # the checkout or exported tree its gateway must be imported from
    facts: dict[str, str]  # source, python and package versions, as the revision's Python reports them

    @property
    def is_baseline(self) -> bool:
        return self.label == "baseline"


def _facts(python: Path, tree: Path) -> dict[str, str]:
    """What `python` imports the gateway from, checked to be inside `tree`."""
    result = subprocess.run([str(python), "-c", _FACTS], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise BenchError(f"{python} cannot import okta_agent_proxy:\n{result.stderr[-2000:]}")
    facts: dict[str, str] = json.loads(result.stdout.strip().splitlines()[-1])
    if not Path(facts["source"]).resolve().is_relative_to(tree.resolve()):
        raise BenchError(f"{python} imports okta_agent_proxy from {facts['source']}, not from {tree}")
    return facts


def current_revision() -> Revision:
    """This checkout, run with the Python running the bench (the project's venv under `./run bench`)."""
    python = Path(sys.executable)
    gateway = python.parent / "okta-agent-proxy"
    if not gateway.exists():
        raise BenchError(f"{gateway} not found: run this with the project's venv (./run bench)")
    return Revision("current", git_describe() or "?", python, gateway, "", REPOSITORY, _facts(python, REPOSITORY))


def resolve(revision: str, repository: Path = REPOSITORY) -> str:
    """The full commit id `revision` names (a sha, tag, branch, `HEAD~1`, …)."""
    command = ["git", "-C", str(repository), "rev-parse", "--verify", "--quiet", "--end-of-options"]
    result = subprocess.run(
        [*command, f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise BenchError(f"--baseline {revision!r} names no commit of the repository at {repository}")
    return result.stdout.strip()


def export_tree(sha: str, folder: Path, repository: Path = REPOSITORY) -> Path:
    """`folder/tree`: the files of commit `sha`, unpacked once; a leftover partial export is discarded."""
    tree = folder / "tree"
    if tree.is_dir():
        return tree
    partial = folder / "tree.partial"
    shutil.rmtree(partial, ignore_errors=True)
    archive = subprocess.run(
        ["git", "-C", str(repository), "archive", "--format=tar", sha], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise BenchError(f"git archive {sha} failed: {archive.stderr.decode(errors='replace').strip()}")
    partial.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(partial, filter="data")
    partial.rename(tree)
    return tree


def runtime_lock(tree: Path) -> Path:
    """The revision's lock file: `requirements.lock` (runtime only once the development tools have their own)."""
    lock = tree / RUNTIME_LOCK
    if lock.is_file():
        return lock
    others = sorted(p for p in tree.glob("requirements*.lock") if "dev" not in p.name)
    if not others:
        raise BenchError(f"{tree.name} of the baseline has no {RUNTIME_LOCK}: its dependencies are not pinned")
    return others[0]


def ensure_venv(tree: Path, venv: Path) -> Path:
    """`venv`, holding the lock file's packages and `tree` installed editable; made once, redone if incomplete."""
    lock = runtime_lock(tree)
    stamp = venv / ".bench-installed"
    expected = f"{lock.name} {hashlib.sha256(lock.read_bytes()).hexdigest()} python {sys.version.split()[0]}\n"
    python = venv / "bin" / "python"
    if stamp.is_file() and stamp.read_text() == expected and python.exists():
        return python
    print(
        f"bench: installing the baseline into {venv} from its {lock.name} (once per revision, ~150 MB; "
        f"rm -rf {venv.parent.parent} reclaims them all)",
        flush=True,
    )
    shutil.rmtree(venv, ignore_errors=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "-r", str(lock)],
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(tree)],
    ]
    for command in steps:
        result = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_SECONDS, check=False)
        if result.returncode != 0:
            raise BenchError(f"`{' '.join(command)}` failed:\n{(result.stdout + result.stderr)[-3000:]}")
    stamp.write_text(expected)
    return python


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"bench: waiting for another bench preparing {path.parent.name[:12]}", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_baseline(revision: str, cache: Path = CACHE, repository: Path = REPOSITORY) -> Revision:
    """The gateway of git `revision`, exported and installed under `cache/<sha>` (reused when already there)."""
    sha = resolve(revision, repository)
    folder = cache / sha
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        tree = export_tree(sha, folder, repository)
        python = ensure_venv(tree, folder / "venv")
    gateway = python.parent / "okta-agent-proxy"
    if not gateway.exists():
        raise BenchError(f"{gateway} not found after installing the baseline")
    describe = git_describe(sha) or sha[:12]
    name = describe if revision in (describe, sha) else f"{revision} = {describe}"
    return Revision("baseline", name, python, gateway, BASELINE_MARK, tree, _facts(python, tree))
