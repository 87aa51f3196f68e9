#!/usr/bin/env bash
# A tour of the API, step by step, for a server that has just started on
# empty databases. Each step states the status it expects and the tour
# stops at the first answer that differs.
#
#   TOKEN=evt_… bash docs/tour.sh
#
# Environment:
#   URL         the server (default http://127.0.0.1:8080)
#   TOKEN       the admin token that the first start printed
#   EVENTVAULT  the binary, for the commands that open the databases
#               themselves (`principal add`, `audit verify`): default
#               `eventvault` on the PATH, else target/release/eventvault.
#               Run the tour where the server runs, or give that binary the
#               server's settings (EVENTVAULT_DATABASE_URL, …).
# It needs bash, curl and jq.
#
# The README shows this tour: each part between a "# readme: NAME" line and
# the next "# readme: end" is one of its code blocks, byte for byte, and
# nothing else runs. tests/integration/tour.rs holds the two together and
# runs the tour against the real binary on SQLite and on PostgreSQL.
set -euo pipefail

# readme: setup
URL=${URL:-http://127.0.0.1:8080}
: "${TOKEN:?the admin token that the first start printed}"
EVENTVAULT=${EVENTVAULT:-$(command -v eventvault || echo target/release/eventvault)}

# call STATUS CURL-ARGS…: one request; prints the body of the answer, and
# stops unless its status is STATUS.
call() {
  local want=$1 out
  shift
  out=$(curl -sS -w '\n%{http_code}' "$@")
  printf '%s\n' "${out%$'\n'*}"
  echo "HTTP ${out##*$'\n'}" >&2
  [ "${out##*$'\n'}" = "$want" ] || { echo "expected HTTP $want" >&2; return 1; }
}
ADMIN=(-H "Authorization: Bearer $TOKEN")
JSON=(-H 'Content-Type: application/json')

# Two more principals; each token is the last line printed
SUPPORT_TOKEN=$("$EVENTVAULT" principal add support --role support | tail -1)
DPO_TOKEN=$("$EVENTVAULT" principal add dpo --role dpo | tail -1)
SUPPORT=(-H "Authorization: Bearer $SUPPORT_TOKEN")
DPO=(-H "Authorization: Bearer $DPO_TOKEN")
# readme: end

# readme: streams
# Append, atomically (1 to 1000 events). Expected-Version: any | no-stream | exists | N.
# Amounts as JSON strings: the store keeps a JSON number digit for digit, but
# most clients read one as a float.
DEPOSITS='{"events":[
  {"id":"7f0c5d1e-8d3b-4c1a-9d5e-2b1f0a3c4d5e","type":"MoneyDeposited","subject":"cust-42",
   "data":{"account":"ACC-1","amount":"125.50","currency":"EUR",
           "payer_name":"Jane Roe","payer_iban":"DE89370400440532013000"},
   "metadata":{"channel":"mobile"}},
  {"id":"0b6a3c2e-5f41-4d7a-8c9e-1a2b3c4d5e6f","type":"MoneyWithdrawn","subject":"cust-42",
   "data":{"account":"ACC-1","amount":"20.00","currency":"EUR"}}]}'
call 201 "${ADMIN[@]}" "${JSON[@]}" -H 'Expected-Version: no-stream' \
  "$URL/streams/accounts-ACC-1/events" -d "$DEPOSITS"
# {"stream_id":"accounts-ACC-1","first_version":1,"last_version":2,"first_position":1,"last_position":2}

# The same request again: the same answer, with 200, and nothing written (a retry)
call 200 "${ADMIN[@]}" "${JSON[@]}" -H 'Expected-Version: no-stream' \
  "$URL/streams/accounts-ACC-1/events" -d "$DEPOSITS"

# An Expected-Version that does not hold: 409, and the problem says "current_version":2
call 409 "${ADMIN[@]}" "${JSON[@]}" -H 'Expected-Version: 1' \
  "$URL/streams/accounts-ACC-1/events" -d '{"events":[{"type":"MoneyDeposited",
   "subject":"cust-42","data":{"account":"ACC-1","amount":"1.00","currency":"EUR"}}]}'

# When the second event was recorded, as the server says
AS_OF=$(call 200 "${ADMIN[@]}" "$URL/streams/accounts-ACC-1/events" | jq -r '.events[1].recorded_at')

# Two more events, at the version the stream is at: one about another subject
call 201 "${ADMIN[@]}" "${JSON[@]}" -H 'Expected-Version: 2' \
  "$URL/streams/accounts-ACC-1/events" -d '{"events":[
  {"type":"MoneyDeposited","subject":"cust-42","data":{"account":"ACC-1",
   "amount":"12345678901234567890.000000000000000001","currency":"EUR","payer_name":"Jane Roe"}},
  {"type":"MoneyDeposited","subject":"cust-7","data":{"account":"ACC-1",
   "amount":"0.10","currency":"EUR","payer_name":"John Doe"}}]}'

# Read a stream: from, limit (at most 1000), direction=forward|backward,
# as_of (RFC 3339), to_version
call 200 "${ADMIN[@]}" "$URL/streams/accounts-ACC-1/events?limit=10"
call 200 "${ADMIN[@]}" "$URL/streams/accounts-ACC-1/events?direction=backward&limit=2"
# The stream as it was when its second event was recorded: versions 1 and 2
call 200 "${ADMIN[@]}" "$URL/streams/accounts-ACC-1/events?as_of=$AS_OF"
# As it was at version 3 (with as_of as well: whichever is earlier)
call 200 "${ADMIN[@]}" "$URL/streams/accounts-ACC-1/events?to_version=3"

# A support officer states why (recorded in the audit log); without X-Purpose, 400
call 200 "${SUPPORT[@]}" -H 'X-Purpose: complaint 4711' -H 'X-Correlation-Id: case-4711' \
  "$URL/streams/accounts-ACC-1/events"
call 400 "${SUPPORT[@]}" "$URL/streams/accounts-ACC-1/events"

# Follow the global log: pass "next" back as "after" (as_of works here too)
call 200 "${ADMIN[@]}" "$URL/events?after=0&limit=100"

# Refusals are problems (application/problem+json): no token, a wrong method
call 401 "$URL/streams/accounts-ACC-1/events"
call 405 "${ADMIN[@]}" -X DELETE "$URL/streams/accounts-ACC-1/events"   # Allow: the methods it takes

# No token needed
call 200 "$URL/healthz"
call 200 "$URL/readyz"
# Prometheus text format; see "Metrics" below
call 200 "$URL/metrics" | grep '^eventvault_appends_total'
# readme: end

# readme: snapshots
# Save the folded state of a stream at one of its versions (permission: append);
# "subject" is optional: the state is sealed for every subject of the stream's events
call 200 "${ADMIN[@]}" "${JSON[@]}" -X PUT "$URL/streams/accounts-ACC-1/snapshot" \
  -d '{"version":3,"subject":"cust-42",
       "state":{"balance":"12345678901234567995.500000000000000001","holder":"Jane Roe"}}'
# {"stream_id":"accounts-ACC-1","version":3,"subject":"cust-42"}

# An older version than the one stored: 409 stale-snapshot
call 409 "${ADMIN[@]}" "${JSON[@]}" -X PUT "$URL/streams/accounts-ACC-1/snapshot" \
  -d '{"version":2,"subject":"cust-42","state":{"balance":"105.50"}}'

# Load it (permission: read): 404 when there is none
call 200 "${ADMIN[@]}" "$URL/streams/accounts-ACC-1/snapshot"
# {"stream_id":"accounts-ACC-1","version":3,"subject":"cust-42","state":{…},
#  "personal_data":"decrypted","recorded_at":"…"}
# readme: end

# readme: subjects
# State and event count: {"subject":"cust-42","state":"active","events":3}
# (states: active, forgetting, forgotten, unknown)
call 200 "${DPO[@]}" "$URL/subjects/cust-42"

# Everything stored about the subject (GDPR Art. 15 and 20), decrypted: its events
# in position order, then the snapshots sealed for it; streamed:
# {"subject":"cust-42","state":"active","events":[…],"snapshots":[…]}
call 200 "${DPO[@]}" "$URL/subjects/cust-42/export"

# Right to erasure (Art. 17): destroy the subject's keys (crypto-shredding)
call 200 "${DPO[@]}" "${JSON[@]}" "$URL/subjects/cust-42/forget" -d '{"reason":"ticket 4711"}'
# {"subject":"cust-42","state":"forgotten","forgotten_at":"…","keys_destroyed":1,"events_affected":3}
# (202 with "state":"forgetting" if the keystore does not answer: recorded, and the
# keys are destroyed as soon as it does)

# For everyone now: cust-42's events are "erased" (the amounts stay), cust-7's
# still decrypt, the snapshot is erased, and appends about cust-42 are refused
call 200 "${ADMIN[@]}" "$URL/streams/accounts-ACC-1/events"
call 200 "${ADMIN[@]}" "$URL/streams/accounts-ACC-1/snapshot"
call 410 "${ADMIN[@]}" "${JSON[@]}" "$URL/streams/accounts-ACC-1/events" -d '{"events":[
  {"type":"MoneyWithdrawn","subject":"cust-42","data":{"account":"ACC-1","amount":"5.00","currency":"EUR"}}]}'
call 200 "${DPO[@]}" "$URL/subjects/cust-42"   # "state":"forgotten"
# readme: end

# readme: audit
# Audit records, in order: {"records":[{"seq":1,"recorded_at":…,"hash":"…"},…],"next":…}
# Filters: principal=, action=, resource=, outcome=, since=, until= (RFC 3339)
call 200 "${ADMIN[@]}" "$URL/audit?after=0&limit=100"
call 200 "${ADMIN[@]}" "$URL/audit?principal=support&action=stream.read"

# The hash chain: {"ok":true,"records":…,"head_hash":"…"}
# or {"ok":false,"first_bad_seq":17,"reason":"…"}
call 200 "${ADMIN[@]}" "$URL/audit/verify"

# The same, from the database, read-only: exit 0 if intact, 1 naming the
# first bad record. It prints an --expect value for its head: keep that
# apart from the database, and a later check also fails if that record is
# gone or changed.
"$EVENTVAULT" audit verify
HEAD=$("$EVENTVAULT" audit verify | sed -n 's/.*--expect //p')
"$EVENTVAULT" audit verify --expect "$HEAD"
# readme: end
