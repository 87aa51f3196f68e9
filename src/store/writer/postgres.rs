//! The writer's SQL on PostgreSQL: the writers' lock, the group's snapshot
//! and its rows (arrays per column, unnested), and the notice of a commit
//! to the other processes.

use sqlx::PgConnection;

use super::AppendCommand;
use super::plan::{Found, Plan, all_ids, all_subjects, distinct_streams};
use crate::domain::{Position, StreamId, Version};
use crate::store::feed::COMMIT_CHANNEL;
use crate::store::tx::Conn;
use crate::store::{StoreError, data_keys};

/// Key of the PostgreSQL advisory lock taken by every writer transaction.
/// Any constant works as long as every eventvault process uses the same one.
const WRITER_LOCK: i64 = 0x6576_7661_756c_7401; // "evvault" + 1

/// Takes the writers' lock for the rest of the transaction: one writer
/// transaction at a time among all processes sharing the database.
pub(super) async fn lock_writers(tx: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(WRITER_LOCK)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Tells the other processes that the log reaches `head` now; delivered
/// only if the transaction commits.
pub(super) async fn announce(tx: &mut PgConnection, head: Position) -> Result<(), StoreError> {
    sqlx::query("select pg_notify($1, $2)")
        .bind(COMMIT_CHANNEL)
        .bind(head.to_string())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// What the store holds of the group's streams, event ids and subjects.
pub(super) async fn find(
    tx: &mut PgConnection,
    cmds: &[&AppendCommand],
) -> Result<Found, StoreError> {
    let versions =
        sqlx::query_as("select stream_id, version from streams where stream_id = any($1)")
            .bind(distinct_streams(cmds))
            .fetch_all(&mut *tx)
            .await?;
    let existing = sqlx::query_as(
        "select event_id::text, stream_id, version, position, append_index, append_size
         from events where event_id = any($1)",
    )
    .bind(all_ids(cmds))
    .fetch_all(&mut *tx)
    .await?;
    let subjects = all_subjects(cmds);
    let forgotten = if subjects.is_empty() {
        vec![]
    } else {
        sqlx::query_scalar("select subject from forgotten_subjects where subject = any($1)")
            .bind(subjects)
            .fetch_all(&mut *tx)
            .await?
    };
    Ok(Found {
        versions,
        existing,
        forgotten,
    })
}

pub(super) async fn write(tx: &mut PgConnection, plan: &Plan) -> Result<(), StoreError> {
    if plan.streams.is_empty() {
        return Ok(());
    }
    let (names, versions): (Vec<&StreamId>, Vec<Version>) =
        plan.streams.iter().map(|(s, v)| (s, *v)).unzip();
    sqlx::query(
        "insert into streams (stream_id, version, created_at, updated_at)
         select s, v, $3, $3 from unnest($1::text[], $2::bigint[]) as t(s, v)
         on conflict (stream_id) do update set version = excluded.version, updated_at = excluded.updated_at",
    )
    .bind(names)
    .bind(versions)
    .bind(plan.recorded_at)
    .execute(&mut *tx)
    .await?;
    // One statement for the whole group: arrays per column, unnested.
    let r = &plan.rows;
    sqlx::query(
        "insert into events (position, stream_id, version, event_id, event_type, subject, key_id, data, sealed, metadata,
                             recorded_at, append_index, append_size)
         select p, s, v, i, t, sub, k, d, x, m, $11, ai, an
         from unnest($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::text[], $6::text[], $7::text[], $8::text[],
                     $9::bytea[], $10::text[], $12::int[], $13::int[])
              as u(p, s, v, i, t, sub, k, d, x, m, ai, an)",
    )
    .bind(&r.position)
    .bind(&r.stream_id)
    .bind(&r.version)
    .bind(&r.event_id)
    .bind(&r.event_type)
    .bind(&r.subject)
    .bind(&r.key_id)
    .bind(&r.data)
    .bind(&r.sealed)
    .bind(&r.metadata)
    .bind(plan.recorded_at)
    .bind(&r.append_index)
    .bind(&r.append_size)
    .execute(&mut *tx)
    .await?;
    data_keys::register_key_refs(Conn::Postgres(tx), &r.key_refs()).await
}
