"""Who may do what: the roles, the permissions and the one table that joins them
(README, "Security", shows the same table; a test checks they agree).

A person signs in as a user with one role; a system (an integrator's RIS, a script) uses
an API key, which has a role too. Every door asks ``allowed(role, permission)``.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict


class Role(str, Enum):
    RADIOLOGIST = "radiologist"
    TECHNOLOGIST = "technologist"
    ADMIN = "admin"


class Permission(str, Enum):
    UPLOAD = "upload"  # send studies (web page, REST)
    SEE_ALL_STUDIES = "see_all_studies"  # the department's worklist; else only one's own
    SEE_IDENTITY = "see_identity"  # patient name, ID, birth date, sex, age, accession
    REVIEW = "review"  # mark a study reviewed, agree or disagree with the call
    DELETE = "delete"  # remove a study and its files for everyone
    MANAGE_USERS = "manage_users"  # users and API keys
    AUDIT = "audit"  # read the audit trail
    PURGE = "purge"  # apply the retention


PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.RADIOLOGIST: frozenset(
        {Permission.UPLOAD, Permission.SEE_ALL_STUDIES, Permission.SEE_IDENTITY, Permission.REVIEW}
    ),
    # A technologist sees the studies they sent, with identity (to check it is the right
    # patient), and nobody else's.
    Role.TECHNOLOGIST: frozenset({Permission.UPLOAD, Permission.SEE_IDENTITY}),
    # An administrator runs the system: every study (to delete one), but not who it is.
    Role.ADMIN: frozenset(
        {
            Permission.SEE_ALL_STUDIES,
            Permission.DELETE,
            Permission.MANAGE_USERS,
            Permission.AUDIT,
            Permission.PURGE,
        }
    ),
}


def allowed(role: Role, permission: Permission) -> bool:
    return permission in PERMISSIONS[role]


def may_see_study(role: Role, viewer: str, sender: str | None) -> bool:
    """A study is visible to a role that sees all, else only to the one who sent it."""
    return allowed(role, Permission.SEE_ALL_STUDIES) or (sender is not None and sender == viewer)


class PrincipalKind(str, Enum):
    USER = "user"  # a person, signed in
    KEY = "key"  # a system, with an API key
    OPEN = "open"  # nobody signed in: frontend.sign_in is false (the page says so in red)


class Principal(BaseModel):
    """Who is asking: the name the audit trail records and the role every door checks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    role: Role
    kind: PrincipalKind

    def may(self, permission: Permission) -> bool:
        return allowed(self.role, permission)

    def may_see(self, sender: str | None) -> bool:
        return may_see_study(self.role, self.name, sender)
