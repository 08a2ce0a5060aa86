"""Which MLflow tracking URIs the runner accepts (``format: tracking-uri`` in the schema).

Checked when a spec is validated (and for ``$MLFLOW_TRACKING_URI`` when a stage is planned), so
a URI that cannot work fails with the key and the line instead of a stack trace from a finished
training. No third-party imports: ``runner validate`` stays light.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

# Database stores MLflow reaches through SQLAlchemy ("postgresql+psycopg2" and the like too).
_DATABASES = ("postgresql", "mysql", "mssql")
SCHEMES = ("http", "https", "sqlite", "file", "databricks", *_DATABASES)


def tracking_uri_problem(uri: str) -> str | None:
    """Why ``uri`` cannot be an MLflow tracking URI, or None.

    http(s)://host[:port][/path] (a tracking server), sqlite:///path.db, file:/path (a folder
    store), postgresql/mysql/mssql[+driver]://host/db, databricks[://profile]. A password inside
    the URI is refused: a spec is committed to git (use MLFLOW_TRACKING_PASSWORD, .pgpass...).
    """
    if uri == "databricks":  # the default Databricks profile
        return None
    scheme, sep, rest = uri.partition(":")
    base = scheme.split("+", 1)[0].lower()
    if not sep or base not in SCHEMES or ("+" in scheme and base not in _DATABASES):
        return (f"unknown scheme {scheme + ':' if sep else '(none)'}: use one of "
                "http(s)://host:port, sqlite:///file.db, file:/folder, postgresql://..., databricks")
    parts = urlsplit(uri)
    if parts.password:
        return "it holds a password; put it in the environment (MLFLOW_TRACKING_PASSWORD, .pgpass) instead"
    if base in ("http", "https"):
        try:
            parts.port  # noqa: B018  (raises on a port that is not a number)
        except ValueError:
            return "its port is not a number"
        if not parts.hostname:
            return "it names no host (http://host:port)"
    if base == "sqlite" and not rest.startswith("///"):
        return "a SQLite store is written sqlite:///relative.db or sqlite:////absolute/path.db"
    if base in _DATABASES and not parts.hostname:
        return f"it names no database host ({base}://host/database)"
    return None


def local_path(uri: str) -> str | None:
    """The file or folder a sqlite: or file: URI names (as written), else None."""
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///"):]
    if uri.startswith("file:"):
        rest = uri[len("file:"):]
        return rest[2:] if rest.startswith("//") else rest
    return None


def resolve_relative(uri: str, base: Path) -> str:
    """A sqlite: or file: URI whose path is relative, made absolute against ``base`` (the spec's
    folder, like every path in a spec); other URIs unchanged."""
    path = local_path(uri)
    if path is None or not path or Path(path).is_absolute():
        return uri
    full = (base / path).resolve()
    return f"sqlite:///{full}" if uri.startswith("sqlite:") else full.as_uri()


def web_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run, for a tracking server; None for local stores."""
    if not uri.lower().startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
