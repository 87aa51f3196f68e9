-- How far each outbox relay has published the global log. Not an event and
-- not an audit record: a cursor, rewritten in place after every batch the
-- broker acknowledged, so a restarted relay resumes where it stopped instead
-- of from the start. A relay that crashed between the broker's acknowledgement
-- and this update publishes that batch again; the broker drops the repeats by
-- event id. `name` says which relay (and so which destination) it belongs to.
create table relay_checkpoints (
    name        text    primary key not null,
    position    integer not null check (position >= 0),  -- last position acknowledged
    updated_at  integer not null  -- microseconds since the Unix epoch, UTC
) strict;
