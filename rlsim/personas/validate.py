"""Parse and check a rating answer: ids, scale, completeness; repair what can be repaired.

An answer is parsed as JSON (```json fences and surrounding prose are stripped). If that fails
(truncated or malformed JSON), "id": value pairs are recovered with a regex. Each expected id
then gets a rating (clipped and snapped onto the scale, counted as repaired when it moved) or
stays missing, to be asked again; ids that were not asked are ignored and counted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from rlsim.data.schema import RatingScale

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
_PAIR = re.compile(r'"?(\d+)"?\s*:\s*"?(-?\d+(?:\.\d+)?)')


@dataclass
class Parsed:
    ratings: dict[int, float] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    invalid: dict[int, str] = field(default_factory=dict)  # id -> why its value was unusable
    unexpected_ids: list[int] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)  # values clipped or snapped onto the scale
    parse: str = "json"  # json | fenced | regex | failed

    @property
    def complete(self) -> bool:
        return not self.missing and not self.invalid


def load_json(text: str) -> tuple[dict | None, str]:
    """The JSON object of an answer (fences and prose around it stripped) and how it was read: json,
    fenced or failed (None). A single nested object ({"ratings": {...}}) is unwrapped."""
    t = text.strip()
    m = _FENCE.search(t)
    how = "json"
    if m:
        t, how = m.group(1).strip(), "fenced"
    for candidate in (t, t[t.find("{"): t.rfind("}") + 1] if "{" in t and "}" in t else ""):
        if not candidate:
            continue
        try:
            obj = json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            # Accept {"ratings": {...}} as well as the flat mapping.
            if len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
                obj = next(iter(obj.values()))
            return obj, how
    return None, "failed"


def parse_ratings(text: str, expected: list[int], scale: RatingScale) -> Parsed:
    obj, how = load_json(text or "")
    if obj is None:
        pairs = _PAIR.findall(text or "")
        obj = {k: v for k, v in pairs}
        how = "regex" if pairs else "failed"
    out = Parsed(parse=how)
    exp = {int(i) for i in expected}
    values: dict[int, object] = {}
    for k, v in obj.items():
        try:
            iid = int(str(k).strip())
        except ValueError:
            continue
        if iid in exp:
            values[iid] = v
        else:
            out.unexpected_ids.append(iid)
    for iid in expected:
        iid = int(iid)
        if iid not in values:
            out.missing.append(iid)
            continue
        v = values[iid]
        try:
            x = float(v)  # numbers, and numeric strings like "4"
        except (TypeError, ValueError):
            out.invalid[iid] = f"non-numeric value {str(v)[:20]!r}"
            continue
        if not np.isfinite(x):
            out.invalid[iid] = "non-finite value"
            continue
        # Slightly off (6 on 1-5, 3.7 on whole stars) is repaired by clip/snap; far off is asked again.
        if x < scale.min - 1.0 or x > scale.max + 1.0:
            out.invalid[iid] = f"value {x:g} off the scale"
            continue
        snapped = float(scale.round(scale.clip(x)))
        if snapped != x:
            out.repaired.append(iid)
        out.ratings[iid] = snapped
    return out
