-- Every data key the event store refers to, once, with its subject (see the
-- SQLite schema): filled by the writer in each group's transaction and by a
-- snapshot with its key, so that the start-up check that every key exists in
-- the keystore is one pass over keys, not over events.
create table data_keys (
    key_id         text   primary key,
    subject        text   not null,
    registered_at  bigint not null
);

insert into data_keys (key_id, subject, registered_at)
    select key_id, min(subject), min(recorded_at) from (
        select key_id, subject, recorded_at from events where key_id is not null
        union all
        select k.key_id, k.subject, s.recorded_at from snapshot_keys k join snapshots s on s.stream_id = k.stream_id
    ) refs group by key_id;

-- Keys a forget destroys, recorded before the keystore deletes them (the
-- durable count; `forgotten_subjects.keys_destroyed` keeps the count of
-- forgets made before this table and is no longer written).
create table destroyed_keys (
    key_id        text   primary key,
    subject       text   not null,
    destroyed_at  bigint not null
);

create index destroyed_keys_subject on destroyed_keys (subject);

-- Forgets carried out to their end, apart from the ledger, which is never
-- updated (the serving role has no UPDATE on it).
create table forgets_completed (
    subject       text   primary key,
    completed_at  bigint not null
);

insert into forgets_completed (subject, completed_at)
    select subject, completed_at from forgotten_subjects where completed_at is not null;

-- Missing data keys whose loss an operator accepted (`--accept-missing-keys`).
create table lost_keys (
    key_id       text   primary key,
    subject      text   not null,
    accepted_at  bigint not null
);

-- The ledger and these records are facts: no update, delete or truncate,
-- whoever asks (the serving role has no such privilege either; these
-- triggers hold against the owner's mistakes too).
create trigger forgotten_subjects_append_only before update or delete on forgotten_subjects
    for each row execute function eventvault_append_only();
create trigger forgotten_subjects_no_truncate before truncate on forgotten_subjects
    for each statement execute function eventvault_append_only();
create trigger data_keys_append_only before update or delete on data_keys
    for each row execute function eventvault_append_only();
create trigger data_keys_no_truncate before truncate on data_keys
    for each statement execute function eventvault_append_only();
create trigger destroyed_keys_append_only before update or delete on destroyed_keys
    for each row execute function eventvault_append_only();
create trigger destroyed_keys_no_truncate before truncate on destroyed_keys
    for each statement execute function eventvault_append_only();
create trigger forgets_completed_append_only before update or delete on forgets_completed
    for each row execute function eventvault_append_only();
create trigger forgets_completed_no_truncate before truncate on forgets_completed
    for each statement execute function eventvault_append_only();
create trigger lost_keys_append_only before update or delete on lost_keys
    for each row execute function eventvault_append_only();
create trigger lost_keys_no_truncate before truncate on lost_keys
    for each statement execute function eventvault_append_only();
