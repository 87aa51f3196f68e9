-- One row that readiness rewrites while the writer's last transaction has
-- failed (a full disk, a database that went away): committing a write is the
-- only honest test that writes commit again. It holds nothing else and is
-- never read by the service.
create table write_probe (
    id         integer primary key check (id = 1),
    probed_at  integer not null  -- microseconds since the Unix epoch, UTC
) strict;
