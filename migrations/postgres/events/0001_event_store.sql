-- The event store (PostgreSQL). Same shape as the SQLite schema; times are
-- microseconds since the Unix epoch (UTC) in both, so that the service's code
-- and the `as_of` arithmetic are the same on either backend.

-- One row per stream: its current version (= number of events), bumped in the
-- same transaction as the events.
create table streams (
    stream_id   text   primary key,
    version     bigint not null check (version >= 1),
    created_at  bigint not null,
    updated_at  bigint not null
);

-- Append-only. `position` is the gapless global order: the writer assigns it
-- while holding a transaction-level advisory lock, so positions follow commit
-- order even with several eventvault processes on one database. `data` holds
-- only the clear fields, as text, so numbers keep every digit (jsonb would
-- normalise them); personal fields live sealed in `sealed` under `key_id`.
create table events (
    position     bigint primary key,
    stream_id    text   not null references streams (stream_id),
    version      bigint not null check (version >= 1),
    event_id     uuid   not null unique,
    event_type   text   not null,
    subject      text,
    key_id       text,
    data         text   not null,
    sealed       bytea,
    metadata     text   not null,
    recorded_at  bigint not null,
    -- index of this event within its append, and that append's size: an
    -- idempotent retry must repeat an earlier append exactly, not a part of it
    append_index integer not null check (append_index >= 0),
    append_size  integer not null check (append_size >= 1 and append_index < append_size),
    unique (stream_id, version),
    check ((sealed is null) = (key_id is null)),
    check (key_id is null or subject is not null)
);

create index events_subject on events (subject) where subject is not null;
create index events_recorded_at on events (recorded_at);

-- History is never rewritten: refuse updates, deletes and truncation.
create function eventvault_append_only() returns trigger language plpgsql as $$
begin
    raise exception '% is append-only', tg_table_name;
end;
$$;

create trigger events_append_only before update or delete on events
    for each row execute function eventvault_append_only();
create trigger events_no_truncate before truncate on events
    for each statement execute function eventvault_append_only();

create table snapshots (
    stream_id    text   primary key references streams (stream_id),
    version      bigint not null check (version >= 1),
    subject      text,
    key_id       text,
    state        text,
    sealed       bytea,
    recorded_at  bigint not null
);

-- The forget ledger, replayed at every start (see the SQLite schema).
create table forgotten_subjects (
    subject         text   primary key,
    forgotten_at    bigint not null,
    reason          text,
    keys_destroyed  bigint not null default 0,
    completed_at    bigint
);

-- The tamper-evident access log.
create table audit_log (
    seq             bigint  primary key,
    recorded_at     bigint  not null,
    principal       text,
    action          text    not null,
    resource        text    not null,
    outcome         text    not null check (outcome in ('ok', 'denied', 'error')),
    event_count     bigint  not null default 0,
    personal_data   boolean not null default false,
    correlation_id  text,
    causation_id    text,
    purpose         text,
    request_id      text,
    prev_hash       bytea   not null,
    hash            bytea   not null
);

create trigger audit_log_append_only before update or delete on audit_log
    for each row execute function eventvault_append_only();
create trigger audit_log_no_truncate before truncate on audit_log
    for each statement execute function eventvault_append_only();

-- Callers; only the SHA-256 of each bearer token is stored.
create table principals (
    name        text   primary key,
    roles       text   not null,
    token_hash  text   not null unique,
    created_at  bigint not null
);
