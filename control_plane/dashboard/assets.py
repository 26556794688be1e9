"""The dashboard's files: its page, script and style (package data beside this module)
and plotly.js from the installed ``plotly`` package. Nothing comes from the internet.

Files are read once and kept with their ETag and, for the big ones, a gzip copy made on
first use (plotly.min.js: 4.8 MB, 1.4 MB gzipped).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ASSETS", "Asset", "AssetMissing", "load_asset", "plotly_js_path"]

STATIC = Path(__file__).resolve().parent / "static"
# served name -> media type; anything else is a 404
ASSETS = {
    "dashboard.html": "text/html; charset=utf-8",
    "login.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "plotly.min.js": "text/javascript; charset=utf-8",
}
_GZIP_FROM_BYTES = 16 * 1024


class AssetMissing(RuntimeError):
    """A file the dashboard needs is not installed."""


@dataclass(frozen=True)
class Asset:
    """One file as served."""

    name: str
    body: bytes
    media_type: str
    etag: str

    @functools.cached_property
    def gzipped(self) -> bytes | None:
        """The body gzipped, when that is worth it (made once, on first use)."""
        if len(self.body) < _GZIP_FROM_BYTES:
            return None
        return gzip.compress(self.body, compresslevel=6, mtime=0)


def plotly_js_path() -> Path:
    """plotly.min.js of the installed ``plotly`` package, found without importing it."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing("the dashboard needs the 'plotly' package (pip install plotly)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path
    raise AssetMissing("the installed 'plotly' package has no package_data/plotly.min.js")


@functools.cache
def load_asset(name: str) -> Asset:
    """The file ``name`` (one of :data:`ASSETS`); KeyError for any other name."""
    media_type = ASSETS[name]
    path = plotly_js_path() if name == "plotly.min.js" else STATIC / name
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise AssetMissing(f"dashboard file {path} is missing: {exc}") from None
    return Asset(name, body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
