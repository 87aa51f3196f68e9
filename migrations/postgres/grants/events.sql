-- The least privileges of the role `eventvault serve` connects to the event
-- store as, when it is not the owner of the tables (the owner runs
-- `eventvault migrate`, which applies this file with `--grant-to ROLE`; or
-- by hand: psql -v role=eventvault_app -d <event store> -f events.sql).
-- Re-run it after every migration that adds a table.
--
-- History stays history: no UPDATE, DELETE or TRUNCATE on `events`,
-- `audit_log`, the forget ledger and the key records, and, not being the
-- owner, the role cannot drop or disable the triggers that refuse them
-- either. Principals are managed by the owner (`eventvault principal …`):
-- the service only reads them.
grant connect on database :"DBNAME" to :"role";
grant usage on schema public to :"role";
-- `serve` checks that every migration it knows is applied.
grant select on _sqlx_migrations to :"role";
-- Append: a stream's version is bumped in the events' transaction.
grant select, insert, update on streams to :"role";
grant select, insert on events to :"role";
grant select, insert on audit_log to :"role";
-- A stream's snapshot is replaced by a newer one, never deleted; the list
-- of the subjects and keys it is sealed for is replaced with it.
grant select, insert, update on snapshots to :"role";
grant select, insert, delete on snapshot_keys to :"role";
grant select, insert on forgotten_subjects to :"role";
grant select, insert on data_keys, destroyed_keys, forgets_completed, lost_keys to :"role";
grant select on principals to :"role";
-- The outbox relay's cursor is rewritten in place after every batch.
grant select, insert, update on relay_checkpoints to :"role";
-- Readiness rewrites its one row while the writer's last group failed.
grant select, insert, update on write_probe to :"role";
