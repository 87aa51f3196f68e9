-- A principal may be bound to a client certificate instead of a bearer
-- token: the SHA-256 of the certificate's DER, in lower-case hex (what a
-- verified TLS client presents is looked up by it). Such a principal has no
-- token, so `token_hash` becomes optional; every principal has one of the
-- two. SQLite cannot drop a NOT NULL: the table is rebuilt (nothing refers
-- to it).
create table principals_new (
    name                text    primary key not null,
    roles               text    not null,  -- JSON array of role names
    token_hash          text    unique,    -- hex SHA-256 of the bearer token
    client_cert_sha256  text    unique,    -- hex SHA-256 of the certificate's DER
    created_at          integer not null,
    check (token_hash is not null or client_cert_sha256 is not null)
) strict;

insert into principals_new (name, roles, token_hash, client_cert_sha256, created_at)
    select name, roles, token_hash, null, created_at from principals;

drop table principals;

alter table principals_new rename to principals;
