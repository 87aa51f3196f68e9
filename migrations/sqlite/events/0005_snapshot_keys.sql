-- Snapshots sealed for every subject of their stream. A snapshot folds the
-- events of its stream up to its version, and those may be about several
-- data subjects (a joint account); sealed under the one subject it named, it
-- escaped the forgets of the others. Now its state is sealed under a key of
-- its own, and that key is wrapped under the data key of each of those
-- subjects in turn, one layer inside the other (`wrapped_key`): destroying
-- any one of their keys leaves it sealed for good. `snapshot_keys` lists the
-- layers, so that a snapshot reads `erased` as soon as any of its subjects is
-- in the forget ledger, a subject's export finds the snapshots that hold
-- their data, and every key a snapshot needs can be listed.
alter table snapshots add column wrapped_key blob;

create table snapshot_keys (
    stream_id  text    not null references snapshots (stream_id),
    -- 0 is the innermost layer
    layer      integer not null check (layer >= 0),
    subject    text    not null,
    key_id     text    not null,
    primary key (stream_id, layer)
) strict;

-- A subject's snapshots (export, and the forget check of a save).
create index snapshot_keys_subject on snapshot_keys (subject);

-- Snapshots saved before: a sealed one was sealed under the data key of the
-- one subject it named (`key_id`; `wrapped_key` stays null). If its stream
-- holds, up to its version, events of any other subject, its state may hold
-- their data, which their forget would not reach: it is removed (a snapshot
-- is a cache of a fold, which its client saves again). So is one stored in
-- clear (saved without a subject, which was allowed) whose stream holds,
-- up to its version, events of any subject: no forget would reach it.
-- Every other one keeps its form, with its one key listed as its layer.
delete from snapshots
 where sealed is not null
   and (subject is null
        or exists (select 1 from events e
                   where e.stream_id = snapshots.stream_id
                     and e.version <= snapshots.version
                     and e.subject is not null
                     and e.subject <> snapshots.subject));

delete from snapshots
 where sealed is null
   and exists (select 1 from events e
               where e.stream_id = snapshots.stream_id
                 and e.version <= snapshots.version
                 and e.subject is not null);

insert into snapshot_keys (stream_id, layer, subject, key_id)
select stream_id, 0, subject, key_id from snapshots where sealed is not null;
