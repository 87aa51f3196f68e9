-- Every data key the event store refers to, once, with its subject. The
-- writer adds the keys of a group's sealed events in the group's
-- transaction (and a snapshot its key with the snapshot), so at start the
-- service can check that each of them still exists in the keystore with one
-- pass over keys rather than over events: a keystore restored from a backup
-- older than the event store, or a replica that was behind, lacks some, and
-- their events must not read as `erased` (the answer of a lawful forget).
create table data_keys (
    key_id         text    primary key not null,
    subject        text    not null,
    registered_at  integer not null  -- microseconds since the Unix epoch, UTC
) strict;

-- What the event store referred to before this table existed.
insert into data_keys (key_id, subject, registered_at)
    select key_id, min(subject), min(recorded_at) from (
        select key_id, subject, recorded_at from events where key_id is not null
        union all
        select k.key_id, k.subject, s.recorded_at from snapshot_keys k join snapshots s on s.stream_id = k.stream_id
    ) group by key_id;

-- Keys a forget destroys, recorded before the keystore deletes them: a
-- forget retried after a later step failed still counts the keys the first
-- attempt deleted (their count is the number of rows here, plus the
-- `forgotten_subjects.keys_destroyed` of forgets made before this table,
-- which is no longer written).
create table destroyed_keys (
    key_id        text    primary key not null,
    subject       text    not null,
    destroyed_at  integer not null
) strict;

create index destroyed_keys_subject on destroyed_keys (subject);

-- Forgets carried out to their end. Apart from the ledger so that the
-- ledger itself is never updated (the serving database role may only
-- insert into it); `forgotten_subjects.completed_at` is no longer written.
create table forgets_completed (
    subject       text    primary key not null,
    completed_at  integer not null
) strict;

insert into forgets_completed (subject, completed_at)
    select subject, completed_at from forgotten_subjects where completed_at is not null;

-- Data keys the keystore lacks although the event store refers to them,
-- whose loss an operator accepted (`serve --accept-missing-keys`): their
-- events read `lost`, never `erased`, and the start no longer refuses for
-- them.
create table lost_keys (
    key_id       text    primary key not null,
    subject      text    not null,
    accepted_at  integer not null
) strict;

-- The ledger and these records are facts, never rewritten.
create trigger forgotten_subjects_no_update before update on forgotten_subjects
begin
    select raise(abort, 'the forget ledger is append-only');
end;
create trigger forgotten_subjects_no_delete before delete on forgotten_subjects
begin
    select raise(abort, 'the forget ledger is append-only');
end;
create trigger data_keys_no_update before update on data_keys
begin
    select raise(abort, 'data_keys is append-only');
end;
create trigger data_keys_no_delete before delete on data_keys
begin
    select raise(abort, 'data_keys is append-only');
end;
create trigger destroyed_keys_no_update before update on destroyed_keys
begin
    select raise(abort, 'destroyed_keys is append-only');
end;
create trigger destroyed_keys_no_delete before delete on destroyed_keys
begin
    select raise(abort, 'destroyed_keys is append-only');
end;
create trigger forgets_completed_no_update before update on forgets_completed
begin
    select raise(abort, 'forgets_completed is append-only');
end;
create trigger forgets_completed_no_delete before delete on forgets_completed
begin
    select raise(abort, 'forgets_completed is append-only');
end;
create trigger lost_keys_no_update before update on lost_keys
begin
    select raise(abort, 'lost_keys is append-only');
end;
create trigger lost_keys_no_delete before delete on lost_keys
begin
    select raise(abort, 'lost_keys is append-only');
end;
