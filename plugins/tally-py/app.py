"""A stateful weir transform written in Python (contract 0.2.0): a running tally of each
customer's orders.

The pipeline's state key is the customer (`[pipeline.state] key = "subject-token:3"` for
subjects like `orders.in.<customer>`). Input: a JSON order with a whole `total_cents`
(0 or more). The plugin adds it to the customer's tally, kept in the key's state as JSON,
and emits the tally after the order on `tally.<customer>`:
`{"customer": "c-7", "orders": 3, "total_cents": 4200}`. Anything else is invalid input:
weir dead-letters it and undoes whatever the call wrote.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import emitter, state
from wit_world.imports.types import Output, TransformError_InvalidInput

TALLY = "tally"


class Transformer(exports.Transformer):
    def transform(self, msg):
        try:
            order = json.loads(msg.payload)
        except ValueError as error:
            raise Err(TransformError_InvalidInput(f"not JSON: {error}"))
        cents = order.get("total_cents") if isinstance(order, dict) else None
        if not isinstance(cents, int) or isinstance(cents, bool) or cents < 0:
            raise Err(TransformError_InvalidInput("expected an order with a whole total_cents of 0 or more"))
        key = msg.state_key
        if not key or any(c in key for c in ".*>") or any(c.isspace() for c in key):
            raise Err(TransformError_InvalidInput(f"state key {key!r} cannot be a subject token"))
        stored = state.get(TALLY)
        tally = json.loads(stored) if stored is not None else {"orders": 0, "total_cents": 0}
        tally["orders"] += 1
        tally["total_cents"] += cents
        state.set(TALLY, json.dumps(tally, separators=(",", ":"), sort_keys=True).encode())
        report = {"customer": key, **tally}
        payload = json.dumps(report, separators=(",", ":"), sort_keys=True).encode()
        emitter.emit(Output(f"tally.{key}", [("Content-Type", "application/json")], payload))
