"""Load `.env` + environment and `config/config.yaml` into checked, frozen objects — or a list of every problem.

Each problem names where it is (`backends.employees.paths[0]`, `env GATEWAY_PORT`) and says what is wrong; it never
quotes a value, so a secret in a bad field cannot leak into a log or a terminal. Secrets in the YAML may be
`${ENV_NAME}` (anywhere in a string) or `{file: path}` (relative to the YAML's folder); literal secrets load, with a
warning. A key written twice in one mapping is an error naming both lines: PyYAML would keep the last silently (a
second `partners:` replacing the first), so the node tree is composed once, checked, and the document built from it.

A load remembers what it was built from: the environment it resolved `${NAME}` against (a reload resolves against
the same snapshot: the environment is read once, at start), the files it read (`check` prints them), and a
fingerprint of the YAML's bytes and each `{file: …}` secret's bytes (a reload applies only a change of those).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from dotenv import dotenv_values
from pydantic import ValidationError

from okta_agent_proxy.config.checks import (
    Problem,
    check_cross_app_settings,
    check_front_door,
    check_request_budgets,
    check_settings_consistency,
    cross_check,
)
from okta_agent_proxy.config.models import AUTH_METHODS, GatewayConfig
from okta_agent_proxy.config.settings import Settings

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_KEYS = frozenset({"key", "password", "target_client_secret", "private_key"})


@dataclass(frozen=True)
class ConfigSources:
    """The files a load read (paths only, never contents)."""

    env_file: str | None = None  # the .env file, if there was one
    yaml: str | None = None  # the YAML, once read
    yaml_hash: str | None = None  # SHA-256 of the YAML's bytes
    secret_files: tuple[str, ...] = ()  # each {file: …} read, in the YAML's order


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every error (and the warnings found on the way), `sources`
    the files read before the load stopped."""

    def __init__(self, problems: list[Problem], sources: ConfigSources | None = None) -> None:
        self.problems = problems
        self.sources = sources
        errors = [p for p in problems if p.severity == "error"]
        super().__init__(f"{len(errors)} configuration error(s): " + "; ".join(str(p) for p in errors[:3]))


@dataclass(frozen=True)
class LoadedConfig:
    settings: Settings
    config: GatewayConfig
    warnings: list[Problem] = field(default_factory=list)
    source: str | None = None  # the YAML's path
    source_hash: str | None = None  # SHA-256 of the YAML's bytes (config_history.file_hash)
    env_file: str | None = None  # the .env file read, for a reload to read it again
    sources: ConfigSources = field(default_factory=ConfigSources)
    fingerprint: str | None = None  # SHA-256 over the YAML's and each {file: …} secret's bytes: in memory only
    # What `${NAME}` was resolved against: a reload resolves against the same snapshot. Holds secrets: never shown.
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)


_VALIDATOR_TAG = re.compile(r"^function-(after|before|wrap|plain)\[")


def format_loc(loc: tuple[int | str, ...]) -> str:
    """('backends', 'employees', 'pre-shared-key', 'paths', 0) → 'backends.employees.paths[0]'. A bad mapping key
    is named by its own path (pydantic appends '[key]'); an empty key shows as "", one with control characters
    escaped, so a path never writes a raw control character to a terminal."""
    out = ""
    for index, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif (index == 2 and loc[0] == "backends" and part in AUTH_METHODS) or _VALIDATOR_TAG.match(part):
            continue  # the backend union's tag, or a validator's name: not YAML keys
        elif part == "[key]" and index == len(loc) - 1:
            continue  # the error is in the key just before
        else:
            shown = '""' if part == "" else part if part.isprintable() else part.encode("unicode_escape").decode()
            out += f".{shown}" if out else shown
    return out


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "union_tag_not_found":
        return f"auth_method is required (one of {', '.join(AUTH_METHODS)})"
    if kind == "union_tag_invalid":
        return f"auth_method must be one of {', '.join(AUTH_METHODS)}"
    message = str(error["msg"])
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def problems_from(exc: ValidationError, prefix: str = "") -> list[Problem]:
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = format_loc(tuple(error["loc"]))
        path = f"{prefix}{loc}" if loc else prefix.rstrip(". ") or "(root)"
        problems.append(Problem(path, _message(error)))
    return problems


def resolve_references(
    node: Any,
    environ: Mapping[str, str],
    base_dir: Path,
    path: str = "",
    *,
    files_read: dict[Path, bytes] | None = None,
) -> tuple[Any, list[Problem]]:
    """Replace `${NAME}` and `{file: path}` throughout the raw YAML tree; warn on literal secrets. Each secret file
    read goes into `files_read` with its bytes."""
    problems: list[Problem] = []
    if isinstance(node, dict):
        if set(node) == {"file"}:
            return _read_secret_file(node["file"], base_dir, path, files_read)
        out = {}
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            literal_string = isinstance(value, str) and value and not _ENV_REF.search(value)
            inline_mapping = isinstance(value, dict) and set(value) != {"file"}
            if key in _SECRET_KEYS and (literal_string or inline_mapping):
                problems.append(Problem(child, "literal secret; prefer ${ENV_NAME} or {file: path}", "warning"))
            out[key], sub = resolve_references(value, environ, base_dir, child, files_read=files_read)
            problems += sub
        return out, problems
    if isinstance(node, list):
        items = []
        for index, value in enumerate(node):
            item, sub = resolve_references(value, environ, base_dir, f"{path}[{index}]", files_read=files_read)
            items.append(item)
            problems += sub
        return items, problems
    if isinstance(node, str) and "${" in node:

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                problems.append(Problem(path, f"environment variable {name} is not set"))
                return ""
            return environ[name]

        return _ENV_REF.sub(substitute, node), problems
    return node, problems


def _read_secret_file(
    name: Any, base_dir: Path, path: str, files_read: dict[Path, bytes] | None
) -> tuple[Any, list[Problem]]:
    if not isinstance(name, str) or not name:
        return None, [Problem(path, "{file: …} needs a path")]
    file = Path(name) if Path(name).is_absolute() else base_dir / name
    try:
        data = file.read_bytes()
    except OSError as exc:
        return None, [Problem(path, f"cannot read secret file {file}: {exc.strerror}")]
    if files_read is not None:
        files_read[file] = data
    try:
        return data.decode("utf-8").rstrip("\r\n"), []
    except UnicodeDecodeError:
        return None, [Problem(path, f"secret file {file} is not UTF-8 text")]


def parse_yaml(text: str) -> tuple[Any, list[Problem]]:
    """The document, and an error per key written twice in one mapping (raises yaml.YAMLError on bad YAML)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        problems = duplicate_keys(node)  # first: constructing merges `<<:` keys into the nodes
        return loader.construct_document(node), problems
    finally:
        loader.dispose()


_MERGE_TAG = "tag:yaml.org,2002:merge"


def duplicate_keys(node: yaml.Node, path: str = "", seen: set[int] | None = None) -> list[Problem]:
    """`backends.partners: duplicate key (lines 12 and 30)` for each repeated key, by the path of the key."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked (or a recursive one)
        return []
    seen.add(id(node))
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        first_lines: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *base`: its keys may be overridden here, by design
                problems += duplicate_keys(value_node, path, seen)
                continue
            child = path
            if isinstance(key_node, yaml.ScalarNode):
                child = f"{path}.{key_node.value}" if path else str(key_node.value)
                line = key_node.start_mark.line + 1
                first = first_lines.get((key_node.tag, key_node.value))
                if first is None:
                    first_lines[(key_node.tag, key_node.value)] = line
                else:  # (one line twice in a flow mapping: `{a: 1, a: 2}`)
                    problems.append(Problem(child, f"duplicate key (lines {first} and {line})"))
            problems += duplicate_keys(value_node, child, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += duplicate_keys(item, f"{path}[{index}]", seen)
    return problems


def load_settings(env_file: str | None = ".env", overrides: Mapping[str, Any] | None = None) -> Settings:
    return Settings(_env_file=env_file, **(overrides or {}))


def load(
    config_path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | None = ".env",
    overrides: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Load settings and YAML; raise ConfigError listing every problem (warnings included) if any is an error.

    `environ` is what `${NAME}` resolves against (default: the .env file's variables, overridden by the real
    environment); the LoadedConfig keeps it, for a reload to resolve against the same values."""
    if environ is None:
        # `${NAME}` sees the same variables as the settings: the .env file's, overridden by the real environment.
        dotenv = {k: v for k, v in dotenv_values(env_file).items() if v is not None} if env_file else {}
        environ = {**dotenv, **os.environ}
    environ = dict(environ)  # a snapshot: later changes to the caller's mapping do not leak into a reload
    sources = ConfigSources(env_file=str(Path(env_file).absolute()) if env_file and Path(env_file).exists() else None)
    problems: list[Problem] = []
    try:
        settings = load_settings(env_file, overrides)
    except ValidationError as exc:
        problems += [Problem(f"env {p.path}", p.message) for p in problems_from(exc)]
        raise ConfigError(problems, sources) from None
    problems += check_settings_consistency(settings)

    path = Path(config_path or settings.CONFIG_PATH)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([*problems, Problem(str(path), f"cannot read: {exc.strerror}")], sources) from None
    yaml_hash = hashlib.sha256(data).hexdigest()
    sources = replace(sources, yaml=str(path.absolute()), yaml_hash=yaml_hash)
    try:
        raw, duplicates = parse_yaml(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([*problems, Problem(str(path), "not UTF-8 text")], sources) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = Problem(where, f"not valid YAML ({getattr(exc, 'problem', exc)})")
        raise ConfigError([*problems, problem], sources) from None
    problems += duplicates
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([*problems, Problem("(root)", "must be a mapping with backends: and agents:")], sources)

    files_read: dict[Path, bytes] = {}
    resolved, reference_problems = resolve_references(raw, environ, path.parent, files_read=files_read)
    sources = replace(sources, secret_files=tuple(str(file.absolute()) for file in files_read))
    problems += reference_problems
    try:
        config = GatewayConfig.model_validate(resolved)
    except ValidationError as exc:
        # A field whose reference did not resolve has already been reported; skip its knock-on errors.
        reported = {p.path for p in reference_problems if p.severity == "error"}
        problems += [p for p in problems_from(exc) if p.path not in reported]
        raise ConfigError(problems, sources) from None
    problems += cross_check(config, front_door=settings.front_door)
    problems += check_cross_app_settings(config, settings)
    problems += check_front_door(config, settings)
    problems += check_request_budgets(config, settings)
    if any(p.severity == "error" for p in problems):
        raise ConfigError(problems, sources)
    return LoadedConfig(
        settings,
        config,
        problems,
        str(path),
        yaml_hash,
        env_file,
        sources=sources,
        fingerprint=_fingerprint(data, files_read),
        environ=environ,
    )


def _fingerprint(yaml_bytes: bytes, files_read: Mapping[Path, bytes]) -> str:
    """Changes when the YAML or any secret file it references changes. Kept in memory only: it is derived from
    secrets, so it is never logged or stored (config_history records the YAML's own hash)."""
    digest = hashlib.sha256()
    for part in (yaml_bytes, *(item for file, data in files_read.items() for item in (str(file).encode(), data))):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()
