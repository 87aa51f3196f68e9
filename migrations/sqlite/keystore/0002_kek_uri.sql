-- Where each master key lives, as the operator named it: `file:PATH` or a
-- PKCS#11 URI (`pkcs11:token=…;object=…`; never a PIN). `keys status` shows
-- it; it is null for a key recorded before this was kept, until the service
-- next starts with that key.
alter table keks add column uri text;

-- A master-key rotation walks the data keys of one master key, and the
-- start checks that none is left under a master key it does not have.
create index deks_kek on deks (kek_id, key_id);
