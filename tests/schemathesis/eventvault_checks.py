"""Checks of eventvault's own, added to schemathesis's (SCHEMATHESIS_HOOKS).

`no_personal_value`: no response may carry any of the personal values listed,
as a JSON array, in the environment variable EVENTVAULT_PERSONAL_VALUES. The
test that runs schemathesis stores those values in events and a snapshot, then
calls the API as a caller without `read_personal`.
"""

import json
import os

import schemathesis

PERSONAL_VALUES = json.loads(os.environ.get("EVENTVAULT_PERSONAL_VALUES", "[]"))


@schemathesis.check
def no_personal_value(ctx, response, case):
    if not PERSONAL_VALUES:
        return None
    body = response.content.decode("utf-8", errors="replace")
    found = sum(1 for value in PERSONAL_VALUES if value in body)
    if found:
        # The values themselves are not repeated here: this message is logged.
        raise AssertionError(
            f"{found} personal value(s) in a response to a caller without read_personal"
        )
    return None


@schemathesis.hook
def before_load_schema(context, raw_schema):
    """Each event of a subscription (`text/event-stream`) is described by
    the document's `x-itemSchema`: OpenAPI 3.2's `itemSchema`, which a 3.1
    document cannot carry (its `schema` is the whole body, a string, for the
    client generators). Schemathesis reads `itemSchema` in any version and
    then checks every event against it."""
    for item in raw_schema.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            for response in operation.get("responses", {}).values():
                media = response.get("content", {}).get("text/event-stream")
                if media is not None and "x-itemSchema" in media:
                    media["itemSchema"] = media["x-itemSchema"]
