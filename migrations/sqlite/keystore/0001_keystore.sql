-- The keystore: a database of its own, apart from the events, so that its
-- backups and their retention can be handled on their own schedule.

-- Every master key (KEK) this keystore has known. `check_blob` is a constant
-- sealed under the KEK: opening it at start proves that the configured master
-- key is the right one before any data key is touched.
create table keks (
    kek_id      text    primary key not null,
    check_blob  blob    not null,
    created_at  integer not null
) strict;

-- Data-encryption keys, one active per subject, stored only wrapped (AES-256-GCM
-- under the KEK named by `kek_id`, associated data binding key id and subject).
-- Rows are deleted by a forget; `secure_delete` overwrites their bytes.
create table deks (
    key_id       text    primary key not null,
    subject      text    not null,
    kek_id       text    not null references keks (kek_id),
    wrapped      blob    not null,
    created_at   integer not null,
    encryptions  integer not null default 0,
    retired_at   integer
) strict;

-- At most one active key per subject: two requests racing to create a
-- subject's first key end with one row, and both use it.
create unique index deks_one_active_per_subject on deks (subject) where retired_at is null;
create index deks_subject on deks (subject);
