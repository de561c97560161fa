"""The configuration reference, generated from the models themselves so the README cannot drift from the code.

`okta-agent-proxy config-schema --markdown` prints it; a test checks that README.md holds exactly this text between
its `config-reference` markers.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from okta_agent_proxy.config.limits import RateLimits, RequestRate, StreamLimits
from okta_agent_proxy.config.models import (
    AccessRule,
    Agent,
    AuditConfig,
    BackendCommon,
    CrossAppAuth,
    FrontDoorConfig,
    PreSharedKeyAuth,
    ServiceAccountAuth,
)
from okta_agent_proxy.config.settings import Settings

SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("backends.<name>", BackendCommon),
    ("backends.<name>.auth_config (auth_method: pre-shared-key)", PreSharedKeyAuth),
    ("backends.<name>.auth_config (auth_method: service-account)", ServiceAccountAuth),
    ("backends.<name>.auth_config (auth_method: okta-cross-app)", CrossAppAuth),
    ("agents.<name>", Agent),
    ("agents.<name>.<tool|resource|prompt>_access.<backend> (AccessRule)", AccessRule),
    ("audit", AuditConfig),
    ("rate_limits", RateLimits),
    ("rate_limits.<per_user|per_agent|per_user_backend|backends.<name>> (RequestRate)", RequestRate),
    ("rate_limits.streams", StreamLimits),
    ("front_door", FrontDoorConfig),
)


def _type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:  # a nested model: its own section, titled with its name
        return str(prop["$ref"]).rsplit("/", 1)[-1]
    if "enum" in prop:
        return " \\| ".join(f"`{value}`" for value in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    if "anyOf" in prop:
        return " or ".join(_type(option) for option in prop["anyOf"] if option.get("type") != "null")
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_type(prop.get('items', {}))}"
    if kind == "object" and "additionalProperties" in prop:
        return f"map of {_type(prop['additionalProperties'])}"
    return str(kind)


def _default(prop: dict[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" not in prop or prop["default"] is None:
        return ""
    value = prop["default"]
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def _rows(model: type[BaseModel]) -> list[str]:
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    rows = []
    for name, prop in schema.get("properties", {}).items():
        if name == "auth_method":
            continue
        description = prop.get("description", "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{name}` | {_type(prop)} | {_default(prop, name in required)} | {description} |")
    return rows


def settings_rows() -> list[str]:
    rows = []
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else f"`{field.default}`"
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {default} | {description} |")
    return rows


def reference_markdown() -> str:
    lines = ["#### Environment", "", "| name | default | meaning |", "|---|---|---|", *settings_rows(), ""]
    lines += ["`auth_method` is one of `okta-cross-app`, `pre-shared-key`, `service-account`.", ""]
    for title, model in SECTIONS:
        lines += [f"#### `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|", *_rows(model), ""]
    return "\n".join(lines).rstrip() + "\n"
