"""Front-door clients (DESIGN.md §8): a `client_id` is either an id `/oauth/register` issued, or the `https://` URL
of the client's metadata document (CIMD), fetched under the rules of `cimd.py` and cached in the store so that other
replicas, and the consent page, see the same name and redirect URIs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from okta_agent_proxy.frontdoor.addresses import CimdRefused
from okta_agent_proxy.frontdoor.cimd import is_client_id_url
from okta_agent_proxy.frontdoor.context import FrontDoorContext


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    client_name: str | None
    redirect_uris: tuple[str, ...]
    verified_host: str | None  # a CIMD client's host (its id is its document's URL); None for a registered one


class UnknownClient(Exception):
    """No such client; the message is safe to show. `why`: for the security event only (a metadata document's
    refusal reason — which would tell an outsider how the gateway's resolver sees internal names)."""

    def __init__(self, message: str, why: str | None = None) -> None:
        super().__init__(message)
        self.why = why


async def find_client(context: FrontDoorContext, client_id: str) -> Client:
    if is_client_id_url(client_id):
        if context.cimd is None:
            raise UnknownClient("this gateway does not accept client metadata documents; register the client")
        try:
            metadata = await context.cimd.get(client_id)
        except CimdRefused as refused:
            raise UnknownClient("the client's metadata document could not be used", str(refused.reason)) from None
        for uri in metadata.redirect_uris:
            if not context.redirects.allows(uri):
                raise UnknownClient(
                    "the client's metadata document lists a redirect URI this gateway does not allow",
                    "redirect_uri_not_allowed",
                )
        await context.store.save_cimd_client(
            client_id=client_id,
            client_name=metadata.client_name,
            redirect_uris=metadata.redirect_uris,
            document={"client_name": metadata.client_name, "redirect_uris": list(metadata.redirect_uris)},
            expires_at=datetime.fromtimestamp(metadata.expires_at, UTC),
        )
        return Client(client_id, metadata.client_name, metadata.redirect_uris, metadata.host)
    stored = await context.store.get_client(client_id)
    if stored is None or stored.kind != "registered":
        raise UnknownClient("unknown client_id: register the client first")
    return Client(client_id, stored.client_name, tuple(stored.redirect_uris), None)
