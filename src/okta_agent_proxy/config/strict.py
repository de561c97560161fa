"""The base of every YAML model: frozen, and an unknown key is an error (naming its YAML path), never ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
