//! The key registry (`data_keys`): every data key the event store refers
//! to, with its subject, and the keys whose loss an operator accepted
//! (`lost_keys`).
//!
//! Whatever stores a reference to a data key (an event's sealed fields, a
//! snapshot) registers it with [`register_key_refs`] in the transaction
//! that stores the reference, so that the registry holds every key any row
//! needs. At start the service checks each registered key of a subject that
//! was not forgotten against the keystore, a page of keys at a time, instead
//! of walking the events.

use super::tx::Conn;
use super::{Db, EventStore, StoreError, now_us, on_db};
use crate::domain::Subject;

/// A reference to a data key: its id and the subject it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyRef<'a> {
    pub key_id: &'a str,
    pub subject: &'a Subject,
}

/// Registers the data keys `refs` refers to (each once; those registered
/// before are left as they are). The one way in for every referrer: call it
/// in the transaction that stores the references, so that a reference never
/// commits without its key in the registry.
pub async fn register_key_refs(conn: Conn<'_>, refs: &[KeyRef<'_>]) -> Result<(), StoreError> {
    let mut refs = refs.to_vec();
    refs.sort();
    refs.dedup_by(|a, b| a.key_id == b.key_id);
    if refs.is_empty() {
        return Ok(());
    }
    let now = now_us();
    match conn {
        Conn::Sqlite(c) => {
            // No array parameters: the pairs travel as one JSON array.
            let pairs: Vec<(&str, &str)> = refs
                .iter()
                .map(|r| (r.key_id, r.subject.as_str()))
                .collect();
            sqlx::query(
                "insert into data_keys (key_id, subject, registered_at)
                 select value ->> 0, value ->> 1, $2 from json_each($1) where true
                 on conflict (key_id) do nothing",
            )
            .bind(serde_json::to_string(&pairs).expect("strings serialise"))
            .bind(now)
            .execute(&mut *c)
            .await?;
        }
        Conn::Postgres(c) => {
            let (ids, subjects): (Vec<&str>, Vec<&str>) =
                refs.iter().map(|r| (r.key_id, r.subject.as_str())).unzip();
            sqlx::query(
                "insert into data_keys (key_id, subject, registered_at)
                 select k, s, $3 from unnest($1::text[], $2::text[]) as t(k, s)
                 on conflict (key_id) do nothing",
            )
            .bind(ids)
            .bind(subjects)
            .bind(now)
            .execute(&mut *c)
            .await?;
        }
    }
    Ok(())
}

impl EventStore {
    /// Up to `limit` registered key ids after `after` (in id order) that
    /// the keystore must hold: of subjects not in the forget ledger, and
    /// not accepted as lost.
    pub async fn expected_keys_page(
        &self,
        after: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_scalar(
                "select k.key_id from data_keys k
                 where k.key_id > $1
                   and not exists (select 1 from forgotten_subjects f where f.subject = k.subject)
                   and not exists (select 1 from lost_keys l where l.key_id = k.key_id)
                 order by k.key_id limit $2",
            )
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?)
    }

    /// Which of `key_ids` the keystore must still hold, asked again (a
    /// forget elsewhere may have destroyed some since they were listed).
    pub async fn still_expected(&self, key_ids: &[String]) -> Result<Vec<String>, StoreError> {
        if key_ids.is_empty() {
            return Ok(vec![]);
        }
        macro_rules! expected {
            ($which:literal) => {
                concat!(
                    "select k.key_id from data_keys k where ",
                    $which,
                    " and not exists (select 1 from forgotten_subjects f where f.subject = k.subject)
                      and not exists (select 1 from lost_keys l where l.key_id = k.key_id)"
                )
            };
        }
        Ok(match &self.db {
            Db::Sqlite(pool) => {
                sqlx::query_scalar(expected!("k.key_id in (select value from json_each($1))"))
                    .bind(serde_json::to_string(key_ids).expect("strings serialise"))
                    .fetch_all(pool)
                    .await?
            }
            Db::Postgres(pool) => {
                sqlx::query_scalar(expected!("k.key_id = any($1)"))
                    .bind(key_ids)
                    .fetch_all(pool)
                    .await?
            }
        })
    }

    /// Records that the loss of `key_ids` is accepted: from now on their
    /// events read `lost`, and the start no longer refuses for them.
    /// Returns how many were newly recorded.
    pub async fn accept_lost_keys(&self, key_ids: &[String]) -> Result<u64, StoreError> {
        if key_ids.is_empty() {
            return Ok(0);
        }
        macro_rules! accept {
            ($which:literal) => {
                concat!(
                    "insert into lost_keys (key_id, subject, accepted_at)
                     select key_id, subject, $2 from data_keys where ",
                    $which,
                    " on conflict (key_id) do nothing"
                )
            };
        }
        let n = match &self.db {
            Db::Sqlite(pool) => sqlx::query(accept!("key_id in (select value from json_each($1))"))
                .bind(serde_json::to_string(key_ids).expect("strings serialise"))
                .bind(now_us())
                .execute(pool)
                .await?
                .rows_affected(),
            Db::Postgres(pool) => sqlx::query(accept!("key_id = any($1)"))
                .bind(key_ids)
                .bind(now_us())
                .execute(pool)
                .await?
                .rows_affected(),
        };
        Ok(n)
    }

    /// Whether the loss of this key was accepted.
    pub async fn key_lost(&self, key_id: &str) -> Result<bool, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_scalar("select exists (select 1 from lost_keys where key_id = $1)")
                .bind(key_id)
                .fetch_one(pool)
                .await
        })?)
    }
}
