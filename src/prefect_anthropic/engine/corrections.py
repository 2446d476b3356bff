"""Token-count corrections learned by earlier runs, kept between runs so `estimate` and the first requests
of the next run start from the real ratio instead of a guess.

Stored as JSON {model: ratio} in $PREFECT_ANTHROPIC_STATE_DIR (default ~/.cache/prefect-anthropic).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["corrections_path", "load_token_corrections", "save_token_corrections"]


def corrections_path() -> Path:
    base = os.environ.get("PREFECT_ANTHROPIC_STATE_DIR") or Path.home() / ".cache" / "prefect-anthropic"
    return Path(base) / "token_corrections.json"


def load_token_corrections() -> dict[str, float]:
    try:
        data = json.loads(corrections_path().read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float)) and 0.2 < v < 5}


def save_token_corrections(ratios: dict[str, float]) -> None:
    """Merge newly learned ratios into the stored ones (best effort: a read-only home is not an error)."""
    if not ratios:
        return
    path = corrections_path()
    merged = {**load_token_corrections(), **{k: round(v, 4) for k, v in ratios.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(merged, indent=2, sort_keys=True))
        os.replace(partial, path)
    except OSError:
        pass
