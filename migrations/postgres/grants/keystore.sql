-- The least privileges of the role `eventvault serve` connects to the
-- keystore as, when it is not the owner of its tables (applied by
-- `eventvault migrate --grant-to ROLE`, or: psql -v role=eventvault_app -d
-- <keystore> -f keystore.sql).
--
-- A forget deletes data keys, so DELETE on `deks` is needed; TRUNCATE is
-- not granted, and master keys are retired only by `eventvault keys
-- rotate-kek`, run as the owner. On PostgreSQL before 17 only a table's
-- owner may VACUUM it: a forget's `VACUUM deks` is then skipped by
-- PostgreSQL (the rows are reclaimed by autovacuum), and the service says so
-- at start. On 17 and later, also: grant maintain on deks to <role>.
grant connect on database :"DBNAME" to :"role";
grant usage on schema public to :"role";
grant select on _sqlx_migrations to :"role";
-- The first start on an empty keystore adopts the master key.
grant select, insert on keks to :"role";
grant select, insert, update, delete on deks to :"role";
