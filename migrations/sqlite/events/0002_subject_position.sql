-- A subject's events in position order (export, forget counts) without a
-- sort of all of them per page.
create index events_subject_position on events (subject, position) where subject is not null;
drop index events_subject;
