"""The review state for the static report: what people decided, and how their ratings agree with
each metric per category. Reads only the artifacts it is given (evaluation folders, curate's
``review.json``); the report stage renders it with ``templates/sections/review.html.j2``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.core.hashing import file_sha256
from runner.review import agreement, decisions


def report_context(data: dict[str, Any], evaluations: dict[str, Path], curated: Path | None) -> dict[str, Any]:
    """``data``: the decisions; ``evaluations``: evaluate stage id -> evaluation folder;
    ``curated``: curate's output folder (its review.json lists decisions for missing images)."""
    tables = []
    for stage_id, folder in sorted(evaluations.items()):
        path = Path(folder) / "evaluation.json"
        if not path.is_file():
            continue
        ev = json.loads(path.read_text(encoding="utf-8"))
        sha_of = {img["path"]: file_sha256(Path(folder) / img["path"]) for c in ev.get("cells", [])
                  for img in c.get("images", []) if (Path(folder) / img.get("path", "")).is_file()}
        rated = agreement.rated_images(ev, data.get("ratings", {}), sha_of)
        pick = data.get("checkpoints", {}).get(stage_id)
        tables.append({"stage": stage_id, "rows": agreement.table(ev, rated), "rated": len(rated),
                       "pick": pick, "best": (ev.get("best") or {}).get("cell")})
    missing = []
    if curated is not None and (Path(curated) / "review.json").is_file():
        missing = json.loads((Path(curated) / "review.json").read_text(encoding="utf-8")).get("missing", [])
    decided = [decisions.describe(s, k, e) for s in decisions.SECTIONS if s != "ratings"
               for k, e in sorted(data.get(s, {}).items())]
    missing = [decisions.describe("images", m["image_id"], {**m, "file": f"image {m['image_id']}"}) for m in missing]
    return {"summary": decisions.summary(data), "agreement": tables, "missing": missing, "decided": decided}
