"""Where the official `kaggle` client finds its credentials, looked up without importing it.

Importing the client without credentials fails (old releases even exit), with a message about the package
rather than about what to do, so `make download` and `make submit` look first, the way the client does:
environment variables, then `kaggle.json` / `access_token` / `credentials.json` in its config folders.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

#: Legacy API key, newer API token, and what `kaggle auth login` writes.
CREDENTIAL_FILES = ("kaggle.json", "access_token", "credentials.json")


def kaggle_config_dir(environ: Mapping[str, str], home: Path) -> Path:
    """The folder the kaggle client reads its files from first."""
    if environ.get("KAGGLE_CONFIG_DIR"):
        return Path(environ["KAGGLE_CONFIG_DIR"])
    return home / ".kaggle"


def find_credentials(environ: Mapping[str, str], home: Path) -> str | None:
    """Where credentials were found (for the log), or None."""
    if environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if environ.get("KAGGLE_USERNAME") and environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    folders = [kaggle_config_dir(environ, home)]
    if environ.get("XDG_CONFIG_HOME"):
        folders.append(Path(environ["XDG_CONFIG_HOME"]) / "kaggle")
    folders.append(home / ".config" / "kaggle")
    for folder in folders:
        for name in CREDENTIAL_FILES:
            if (folder / name).is_file():
                return str(folder / name)
    return None
