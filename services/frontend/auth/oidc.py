"""Single sign-on with the hospital's OpenID Connect provider (authorization-code flow, authlib's
Starlette client): who the provider says the person is, and which role its claims give them.

The provider's claims decide the role at every sign-in (``frontend.oidc.role_map``); a person
whose claims map to no role is refused, whatever the provider thinks of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from authlib.integrations.starlette_client import OAuth

from services.core.access import Role
from services.core.config.services import OidcSettings

CLIENT_NAME = "hospital"
# When claims map to several roles, the one with the most rights over the system wins an
# administrator's sign-in, then the reader's, then the sender's.
ROLE_PRECEDENCE = (Role.ADMIN, Role.RADIOLOGIST, Role.TECHNOLOGIST)


def oidc_client(settings: OidcSettings) -> Any:
    oauth = OAuth()
    oauth.register(
        name=CLIENT_NAME,
        server_metadata_url=settings.issuer.rstrip("/") + "/.well-known/openid-configuration",
        client_id=settings.client_id,
        client_secret=settings.client_secret.get_secret_value(),
        client_kwargs={"scope": settings.scope},
    )
    return oauth.create_client(CLIENT_NAME)


def claim_values(claims: Mapping[str, Any], name: str) -> list[str]:
    """A claim as a list of strings, whether the provider sent one string or a list; a
    dotted name reaches into objects (Keycloak's ``realm_access.roles``)."""
    value: Any = claims
    for part in name.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def role_from_claims(claims: Mapping[str, Any], settings: OidcSettings) -> Role | None:
    granted = {
        settings.role_map[value]
        for value in claim_values(claims, settings.roles_claim)
        if value in settings.role_map
    }
    return next((role for role in ROLE_PRECEDENCE if role in granted), None)


def username_from_claims(claims: Mapping[str, Any], settings: OidcSettings) -> str | None:
    names = claim_values(claims, settings.username_claim) or claim_values(claims, "sub")
    name = names[0].strip() if names else ""
    return name if name and not any(ch.isspace() for ch in name) and len(name) <= 128 else None
