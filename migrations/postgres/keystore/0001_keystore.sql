-- The keystore (PostgreSQL): see the SQLite schema for the why of each table.
create table keks (
    kek_id      text   primary key,
    check_blob  bytea  not null,
    created_at  bigint not null
);

create table deks (
    key_id       text   primary key,
    subject      text   not null,
    kek_id       text   not null references keks (kek_id),
    wrapped      bytea  not null,
    created_at   bigint not null,
    encryptions  bigint not null default 0,
    retired_at   bigint
);

create unique index deks_one_active_per_subject on deks (subject) where retired_at is null;
create index deks_subject on deks (subject);
