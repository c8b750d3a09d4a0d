"""A weir transform written in Python: stamps each JSON object with a time and an id.

Input: a JSON object. Output on `stamped`: the object with `stamped_at_ns` (the clock) and
`stamp_id` (a random UUID). Anything else is invalid input. An object with `"sleep_s"` makes
the plugin sleep first, which weir refuses: data time does not pass during a call. An
object's `"note"` is printed to stderr as it is, control characters and all: weir must
escape it before it reaches its log.

The plugin reads the clock and draws random bytes the ordinary Python way. It stays
deterministic because weir's WASI answers with the message's data time and with bytes seeded
from the message's identity, so a redelivered message gets the same stamp.
"""

import json
import sys
import time
import uuid

import wit_world
from componentize_py_types import Err
from wit_world.exports.transformer import Output, TransformError_InvalidInput


class Transformer(wit_world.exports.Transformer):
    def transform(self, msg):
        try:
            doc = json.loads(msg.payload)
        except ValueError as error:
            raise Err(TransformError_InvalidInput(f"not JSON: {error}"))
        if not isinstance(doc, dict):
            raise Err(TransformError_InvalidInput("expected a JSON object"))
        if "sleep_s" in doc:
            time.sleep(doc["sleep_s"])
        doc["stamped_at_ns"] = time.time_ns()
        doc["stamp_id"] = str(uuid.uuid4())
        print(f"stamped {msg.subject} as {doc['stamp_id']}", file=sys.stderr)
        if "note" in doc:
            print(str(doc["note"]), file=sys.stderr)
        payload = json.dumps(doc, separators=(",", ":")).encode()
        return [Output("stamped", [("Content-Type", "application/json")], payload)]
