"""Drives eventvault through a Python client generated from its own OpenAPI
document (openapi-python-client), as a client team would: every call goes
through the generated functions and models, and each answer must be parsed
into the model the document promises. Run by tests/integration/openapi.rs
with the generated package on PYTHONPATH and EVENTVAULT_URL and
EVENTVAULT_TOKEN (an admin token) in the environment. Prints one line per
step; exits non-zero on the first surprise.
"""

import datetime
import os
import sys
import uuid

import httpx

from eventvault_client import AuthenticatedClient, Client
from eventvault_client.api.audit import verify
from eventvault_client.api.log import subscribe_log
from eventvault_client.api.operations import healthz, readyz
from eventvault_client.api.snapshots import load, save
from eventvault_client.api.streams import append, read
from eventvault_client.api.subjects import forget, state
from eventvault_client.models import (
    AppendExpectedVersionType1,
    AppendRequest,
    Appended,
    Forgotten,
    ForgetRequest,
    Health,
    NewEvent,
    NewEventData,
    NewSnapshot,
    PersonalData,
    Problem,
    Readiness,
    SavedSnapshot,
    Snapshot,
    StreamPage,
    SubjectState,
)
from eventvault_client.types import Unset

BASE = os.environ["EVENTVAULT_URL"]
TOKEN = os.environ["EVENTVAULT_TOKEN"]
STREAM = "accounts-PY-1"


def check(step, response, status, model):
    """The answer has `status`, parses as `model`, and carries the headers
    the document describes on every answer."""
    if response.status_code != status:
        sys.exit(f"{step}: status {response.status_code}, not {status}: {response.content!r}")
    if not isinstance(response.parsed, model):
        sys.exit(f"{step}: parsed as {type(response.parsed).__name__}, not {model.__name__}")
    headers = response.headers
    if headers.get("cache-control") != "no-store" or not headers.get("x-request-id"):
        sys.exit(f"{step}: no Cache-Control: no-store or X-Request-Id: {dict(headers)}")
    print(f"{step}: {status} {model.__name__}")
    return response.parsed


def deposit(subject, amount):
    # Amounts as JSON strings: a float would not keep "125.50" as it is.
    return NewEvent(
        type_="MoneyDeposited",
        subject=subject,
        id=uuid.uuid4(),
        data=NewEventData.from_dict(
            {
                "account": "ACC-PY-1",
                "amount": amount,
                "currency": "EUR",
                "payer_name": f"Payer of {subject}",
                "payer_iban": "DE89370400440532013000",
            }
        ),
    )


def main():
    anonymous = Client(base_url=BASE)
    client = AuthenticatedClient(base_url=BASE, token=TOKEN)

    check("healthz", healthz.sync_detailed(client=anonymous), 200, Health)
    ready = check("readyz", readyz.sync_detailed(client=anonymous), 200, Readiness)
    assert ready.status == "ready", ready

    first = AppendRequest(events=[deposit("customer-py-1", "125.50")])
    made = check(
        "append",
        append.sync_detailed(
            STREAM,
            client=client,
            body=first,
            expected_version=AppendExpectedVersionType1.NO_STREAM,
        ),
        201,
        Appended,
    )
    assert (made.first_version, made.last_version) == (1, 1), made
    # The same events again: the original answer, nothing written.
    again = check(
        "append again",
        append.sync_detailed(STREAM, client=client, body=first),
        200,
        Appended,
    )
    assert again.first_position == made.first_position, again
    # A version that does not hold: a problem with the stream's version.
    conflict = check(
        "append at a wrong version",
        append.sync_detailed(
            STREAM,
            client=client,
            body=AppendRequest(events=[deposit("customer-py-1", "1.00")]),
            # The integer form of Expected-Version. The generated client
            # passes a header of a union type to httpx as it is, and httpx
            # takes only text: hence str().
            expected_version=str(5),
        ),
        409,
        Problem,
    )
    assert conflict.type_ == "urn:eventvault:problem:wrong-expected-version", conflict
    assert conflict.current_version == 1, conflict
    check(
        "append at the version",
        append.sync_detailed(
            STREAM,
            client=client,
            body=AppendRequest(events=[deposit("customer-py-2", "0.10")]),
            expected_version=str(1),
        ),
        201,
        Appended,
    )

    page = check("read", read.sync_detailed(STREAM, client=client), 200, StreamPage)
    amounts = [e.data.additional_properties["amount"] for e in page.events]
    # Exactly as sent, as text: no float on the way.
    assert amounts == ["125.50", "0.10"], amounts
    assert page.events[0].personal_data == PersonalData.DECRYPTED, page.events[0]
    as_of = page.events[0].recorded_at
    assert isinstance(as_of, datetime.datetime), as_of
    then = check(
        "read as of the first event",
        read.sync_detailed(STREAM, client=client, as_of=as_of),
        200,
        StreamPage,
    )
    assert [e.version for e in then.events] == [1], then
    upto = check(
        "read to version 1",
        read.sync_detailed(STREAM, client=client, to_version=1),
        200,
        StreamPage,
    )
    assert len(upto.events) == 1, upto

    check(
        "save a snapshot",
        save.sync_detailed(
            STREAM,
            client=client,
            body=NewSnapshot.from_dict(
                {"version": 2, "subject": "customer-py-1", "state": {"balance": "125.60"}}
            ),
        ),
        200,
        SavedSnapshot,
    )
    snap = check("load the snapshot", load.sync_detailed(STREAM, client=client), 200, Snapshot)
    assert snap.version == 2, snap

    # A forget without a body, and one with a reason.
    gone = check(
        "forget without a body",
        forget.sync_detailed("customer-py-1", client=client),
        200,
        Forgotten,
    )
    assert gone.subject == "customer-py-1" and isinstance(gone.forgotten_at, datetime.datetime)
    check(
        "forget with a reason",
        forget.sync_detailed(
            "customer-py-2", client=client, body=ForgetRequest(reason="ticket 4711")
        ),
        200,
        Forgotten,
    )
    now = check("subject state", state.sync_detailed("customer-py-1", client=client), 200, SubjectState)
    assert now.state.value == "forgotten", now
    erased = check("read after the forgets", read.sync_detailed(STREAM, client=client), 200, StreamPage)
    assert {e.personal_data for e in erased.events} == {PersonalData.ERASED}, erased
    # The clear fields stay.
    assert [e.data.additional_properties["amount"] for e in erased.events] == ["125.50", "0.10"]

    # No token: a problem, parsed as one.
    refused = check(
        "read without a token",
        read.sync_detailed(STREAM, client=AuthenticatedClient(base_url=BASE, token="evt_x")),
        401,
        Problem,
    )
    assert refused.type_ == "urn:eventvault:problem:unauthorized", refused

    # A subscription is an endless text/event-stream, for an SSE client: the
    # generated code must take such a body as text, not as a JSON model.
    sse = "id: 1\ndata: {}\n\n"
    body = subscribe_log._parse_response(client=client, response=httpx.Response(200, text=sse))
    assert body == sse, body
    print("subscription body: text")

    chain = verify.sync_detailed(client=client)
    if chain.status_code != 200 or getattr(chain.parsed, "ok", None) is not True:
        sys.exit(f"audit verify: {chain.status_code} {chain.content!r}")
    print("audit verify: 200 ok")
    print("the generated client works")


if __name__ == "__main__":
    main()
