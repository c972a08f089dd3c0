"""The web dashboard: ``jobs.dashboard(auth=...)`` returns an ASGI app to mount.

Starlette + Jinja2 (``pip install 'asyncjobs[dashboard]'``), server-rendered, no
JavaScript. ``app.py`` holds the pages and actions, ``auth.py`` authentication
and CSRF protection, ``lockout.py`` the limit on guessing basic-auth passwords,
``templates/`` the HTML (autoescaped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncjobs._dashboard.auth import Authenticator
from asyncjobs._errors import ConfigurationError

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs
    from asyncjobs._metrics import ASGIApp

__all__ = ["dashboard_app"]


def dashboard_app(jobs: Jobs, *, auth: object) -> ASGIApp:
    """Build the dashboard for ``jobs``; refuses to build without ``auth``."""
    authenticator = Authenticator(auth, jobs.clock)
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
    except ImportError as error:
        raise ConfigurationError(
            "the dashboard needs starlette and jinja2: pip install 'asyncjobs[dashboard]'"
        ) from error
    from asyncjobs._dashboard.app import Dashboard

    return Dashboard(jobs, authenticator)
