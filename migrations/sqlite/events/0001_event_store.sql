-- The event store (SQLite). Every table the service will ever need is created
-- here, so that later features add behaviour, not schema surprises.

-- One row per stream: its current version (= number of events). The writer
-- reads it to check Expected-Version and bumps it in the same transaction as
-- the events, so the two never disagree.
create table streams (
    stream_id   text    primary key not null,
    version     integer not null check (version >= 1),
    created_at  integer not null,  -- microseconds since the Unix epoch, UTC
    updated_at  integer not null
) strict;

-- The events themselves. Append-only: the triggers below refuse every update
-- and delete, so not even a bug in the service can rewrite history.
--
-- `position` is the gapless global order, assigned by the single writer in
-- commit order. `data` holds only the clear fields (JSON text, kept verbatim so
-- numbers survive digit for digit); the personal fields live in `sealed`,
-- encrypted under the subject's key `key_id`.
create table events (
    position     integer primary key not null,
    stream_id    text    not null references streams (stream_id),
    version      integer not null check (version >= 1),
    event_id     text    not null unique,
    event_type   text    not null,
    subject      text,
    key_id       text,
    data         text    not null,
    sealed       blob,
    metadata     text    not null,
    recorded_at  integer not null,
    -- index of this event within its append, and that append's size: an
    -- idempotent retry must repeat an earlier append exactly, not a part of it
    append_index integer not null check (append_index >= 0),
    append_size  integer not null check (append_size >= 1 and append_index < append_size),
    unique (stream_id, version),
    -- a sealed blob always names the key that opens it, and only events about
    -- a subject are ever sealed
    check ((sealed is null) = (key_id is null)),
    check (key_id is null or subject is not null)
) strict;

create index events_subject on events (subject) where subject is not null;
create index events_recorded_at on events (recorded_at);

create trigger events_no_update before update on events
begin
    select raise(abort, 'events are append-only');
end;

create trigger events_no_delete before delete on events
begin
    select raise(abort, 'events are append-only');
end;

-- Snapshots of a stream's folded state at a version; `sealed` is used when the
-- snapshot belongs to a subject, exactly like an event's personal fields.
create table snapshots (
    stream_id    text    primary key not null references streams (stream_id),
    version      integer not null check (version >= 1),
    subject      text,
    key_id       text,
    state        text,
    sealed       blob,
    recorded_at  integer not null
) strict;

-- The forget ledger: the durable intent to erase a subject. Replayed at every
-- start so that a keystore restored from an old backup cannot bring a
-- forgotten subject back.
create table forgotten_subjects (
    subject         text    primary key not null,
    forgotten_at    integer not null,
    reason          text,
    keys_destroyed  integer not null default 0,
    completed_at    integer
) strict;

-- The tamper-evident access log: hash = SHA-256(prev_hash | canonical record).
-- Rows are never updated or deleted.
create table audit_log (
    seq             integer primary key not null,
    recorded_at     integer not null,
    principal       text,
    action          text    not null,
    resource        text    not null,
    outcome         text    not null check (outcome in ('ok', 'denied', 'error')),
    event_count     integer not null default 0,
    personal_data   integer not null default 0,
    correlation_id  text,
    causation_id    text,
    purpose         text,
    request_id      text,
    prev_hash       blob    not null,
    hash            blob    not null
) strict;

create trigger audit_log_no_update before update on audit_log
begin
    select raise(abort, 'the audit log is append-only');
end;

create trigger audit_log_no_delete before delete on audit_log
begin
    select raise(abort, 'the audit log is append-only');
end;

-- Callers. Only the SHA-256 of a bearer token is stored: a copy of this table
-- lets nobody in.
create table principals (
    name        text    primary key not null,
    roles       text    not null,  -- JSON array of role names
    token_hash  text    not null unique,  -- hex SHA-256 of the bearer token
    created_at  integer not null
) strict;
