"""The workshop's Go example in Python: JSON -> a typed SensorReading, printed as Go's `%+v`.

Where Go printed the error and returned a zero struct, this answers a clear error naming
the field (INVALID_ARGUMENT). A JSON array, or NDJSON (one reading per line), is answered
one line per reading. Types are strict, as Go's: "40" or 40.5 is not an int capacity.
"""

import json
import re
from datetime import datetime

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError, field_validator

RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
MAX_READINGS = 10000


class SensorReading(BaseModel):
    model_config = ConfigDict(extra="ignore")  # Go's json.Unmarshal ignores unknown fields too

    name: StrictStr
    capacity: StrictInt
    time: StrictStr

    @field_validator("time")
    @classmethod
    def _rfc3339(cls, value: str) -> str:
        if not RFC3339.fullmatch(value):
            raise ValueError("not an RFC 3339 timestamp (e.g. 2019-01-21T19:07:28Z)")
        datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))  # real date?
        return value

    def go_format(self) -> str:
        return f"{{Name:{self.name} Capacity:{self.capacity} Time:{self.time}}}"


def _reading(doc, where=""):
    if not isinstance(doc, dict):
        raise ValueError(f"{where}expected a JSON object, got {type(doc).__name__}")
    try:
        return SensorReading.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "reading"
        problem = "missing" if err["type"] == "missing" else err["msg"]
        raise ValueError(f"{where}{field}: {problem}") from None


def _parse(text):
    try:
        return [json.loads(text)], False
    except json.JSONDecodeError as first:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) < 2:
            raise ValueError(
                f"invalid JSON: {first.msg} at line {first.lineno} column {first.colno}"
            ) from None
        docs = []
        for number, line in enumerate(lines, 1):
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON on line {number}: {exc.msg} at column {exc.colno}") from None
        return docs, True


def Handler(req):
    try:
        text = req.input.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"input is not UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise ValueError("empty input: send a JSON reading")
    docs, many = _parse(text)
    if not many and isinstance(docs[0], list):
        docs, many = docs[0], True
    if len(docs) > MAX_READINGS:
        raise ValueError(f"at most {MAX_READINGS} readings per call")
    readings = [_reading(d, f"reading {i}: " if many else "") for i, d in enumerate(docs)]
    return "\n".join(r.go_format() for r in readings) + ("\n" if many else "")
