"""Refusals, each with the HTTP status it answers with and a message naming what is wrong."""

from __future__ import annotations


class NoStormDeployment(Exception):
    """The Prefect server has no storm deployment (``prefect.yaml`` deployed before it
    existed): the alerts start runs of their own instead."""


class Refused(Exception):
    """A request the receiver will not act on; nothing has been started when this is raised."""

    status = 400
    outcome = "refused"

    def __init__(self, message: str, *, field: str | None = None, headers=None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict:
        data = {"error": self.message}
        if self.field:
            data["field"] = self.field
        return data


class BadRequest(Refused):
    status = 400
    outcome = "bad_request"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}", field=field)


class Unauthenticated(Refused):
    """No usable credentials: a missing header, or one that cannot be parsed."""

    status = 401
    outcome = "unauthenticated"


class Forbidden(Refused):
    """Credentials were presented and are wrong, stale or not allowed here."""

    status = 403
    outcome = "forbidden"


class NotEnabled(Refused):
    """The source has no credentials configured, so the receiver accepts nothing from it."""

    status = 404
    outcome = "not_enabled"


class TooLarge(Refused):
    status = 413
    outcome = "too_large"


class UnsupportedMediaType(Refused):
    status = 415
    outcome = "unsupported_media_type"


class Unavailable(Refused):
    """Not the sender's fault (the Prefect server or SNS is unreachable): worth retrying."""

    status = 503
    outcome = "unavailable"
