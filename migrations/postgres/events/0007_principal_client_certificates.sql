-- A principal may be bound to a client certificate instead of a bearer
-- token: the SHA-256 of the certificate's DER, in lower-case hex (what a
-- verified TLS client presents is looked up by it). Such a principal has no
-- token, so `token_hash` becomes optional; every principal has one of the
-- two. The serving role's SELECT on the table (grants/events.sql) covers
-- the new column.
alter table principals alter column token_hash drop not null;

alter table principals add column client_cert_sha256 text unique;

alter table principals add constraint principals_have_a_credential
    check (token_hash is not null or client_cert_sha256 is not null);
