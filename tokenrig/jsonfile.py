"""JSON documents written whole or not at all (a temporary file renamed over the old one), so a reader never
sees half a metadata.json or summary.json."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, document: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str))
    tmp.replace(path)
