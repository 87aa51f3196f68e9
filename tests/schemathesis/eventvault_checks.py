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
