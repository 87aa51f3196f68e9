//! The writer's SQL on SQLite: the group's snapshot and its rows, each in
//! as few statements as the backend allows (no array parameters: lists
//! travel as one JSON array, unpacked by `json_each`).

use sqlx::SqliteConnection;

use super::AppendCommand;
use super::plan::{Found, Plan, all_ids, all_subjects, distinct_streams};
use crate::store::tx::Conn;
use crate::store::{StoreError, data_keys};

/// What the store holds of the group's streams, event ids and subjects.
pub(super) async fn find(
    tx: &mut SqliteConnection,
    cmds: &[&AppendCommand],
) -> Result<Found, StoreError> {
    // SQLite has no array parameters: the id lists travel as one JSON array.
    let streams = serde_json::to_string(&distinct_streams(cmds)).expect("strings serialise");
    let versions = sqlx::query_as("select stream_id, version from streams where stream_id in (select value from json_each($1))")
        .bind(streams)
        .fetch_all(&mut *tx)
        .await?;
    let ids: Vec<String> = all_ids(cmds).iter().map(ToString::to_string).collect();
    let existing = sqlx::query_as(
        "select event_id, stream_id, version, position, append_index, append_size
         from events where event_id in (select value from json_each($1))",
    )
    .bind(serde_json::to_string(&ids).expect("strings serialise"))
    .fetch_all(&mut *tx)
    .await?;
    let subjects = all_subjects(cmds);
    let forgotten = if subjects.is_empty() {
        vec![]
    } else {
        sqlx::query_scalar(
            "select subject from forgotten_subjects where subject in (select value from json_each($1))",
        )
        .bind(serde_json::to_string(&subjects).expect("strings serialise"))
        .fetch_all(&mut *tx)
        .await?
    };
    Ok(Found {
        versions,
        existing,
        forgotten,
    })
}

/// Two statements for the whole group, like the PostgreSQL path: the rows
/// travel as one JSON array, unpacked by `json_each`. Each statement is a
/// round trip to sqlx's SQLite worker thread, so one statement per row made
/// thread hand-offs, not SQLite, the cost of a group.
pub(super) async fn write(tx: &mut SqliteConnection, plan: &Plan) -> Result<(), StoreError> {
    if plan.streams.is_empty() {
        return Ok(());
    }
    let streams = serde_json::to_string(&plan.streams).expect("rows serialise");
    sqlx::query(
        "insert into streams (stream_id, version, created_at, updated_at)
         select value ->> 0, value ->> 1, $2, $2 from json_each($1) where true
         on conflict (stream_id) do update set version = excluded.version, updated_at = excluded.updated_at",
    )
    .bind(streams)
    .bind(plan.recorded_at)
    .execute(&mut *tx)
    .await?;
    let r = &plan.rows;
    let rows: Vec<serde_json::Value> = (0..r.position.len())
        .map(|i| {
            serde_json::json!([
                r.position[i],
                r.stream_id[i],
                r.version[i],
                r.event_id[i].to_string(),
                r.event_type[i],
                r.subject[i],
                r.key_id[i],
                r.data[i],
                r.sealed[i].as_ref().map(hex::encode),
                r.metadata[i],
                r.append_index[i],
                r.append_size[i],
            ])
        })
        .collect();
    sqlx::query(
        "insert into events (position, stream_id, version, event_id, event_type, subject, key_id, data, sealed, metadata,
                             recorded_at, append_index, append_size)
         select value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7,
                unhex(value ->> 8), value ->> 9, $2, value ->> 10, value ->> 11
         from json_each($1)",
    )
    .bind(serde_json::to_string(&rows).expect("rows serialise"))
    .bind(plan.recorded_at)
    .execute(&mut *tx)
    .await?;
    data_keys::register_key_refs(Conn::Sqlite(tx), &plan.rows.key_refs()).await
}
