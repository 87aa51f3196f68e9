//! The `audit_log` table: inserting chained records (inside the writer's
//! transaction), listing them with filters, and walking the chain.

use sqlx::{PgConnection, SqliteConnection};

use super::tx::{Conn, on_conn};
use super::{EventStore, StoreError, count, on_db_sql, to_i64};
use crate::audit::{AuditEntry, AuditRecord, Break, ChainVerifier, GENESIS, Outcome};

/// An audit row as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
struct AuditRow {
    seq: i64,
    recorded_at: i64,
    principal: Option<String>,
    action: String,
    resource: String,
    outcome: String,
    event_count: i64,
    personal_data: i32,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    purpose: Option<String>,
    request_id: Option<String>,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

/// A `select` of whole audit rows followed by `$rest`, for SQLite and for
/// PostgreSQL. `personal_data` is read as a number on both, so that a value
/// other than 0 or 1 (possible in SQLite) is refused, not taken as true.
macro_rules! select_audit {
    ($rest:literal) => {
        select_audit!($rest, $rest)
    };
    ($sqlite:literal, $postgres:literal) => {
        (
            concat!(
                "select seq, recorded_at, principal, action, resource, outcome, event_count, personal_data, ",
                "correlation_id, causation_id, purpose, request_id, prev_hash, hash from audit_log ",
                $sqlite
            ),
            concat!(
                "select seq, recorded_at, principal, action, resource, outcome, event_count, personal_data::int4 as personal_data, ",
                "correlation_id, causation_id, purpose, request_id, prev_hash, hash from audit_log ",
                $postgres
            ),
        )
    };
}

impl TryFrom<AuditRow> for AuditRecord {
    type Error = StoreError;

    fn try_from(r: AuditRow) -> Result<Self, StoreError> {
        let bad = |what: &str| StoreError::Corrupt(format!("audit record {}: {what}", r.seq));
        let outcome = Outcome::parse(&r.outcome).ok_or_else(|| bad("unknown outcome"))?;
        let prev_hash = r
            .prev_hash
            .as_slice()
            .try_into()
            .map_err(|_| bad("prev_hash is not 32 bytes"))?;
        let hash = r
            .hash
            .as_slice()
            .try_into()
            .map_err(|_| bad("hash is not 32 bytes"))?;
        Ok(AuditRecord {
            seq: u64::try_from(r.seq).map_err(|_| bad("negative seq"))?,
            recorded_at_us: r.recorded_at,
            entry: AuditEntry {
                principal: r.principal,
                action: r.action,
                resource: r.resource,
                outcome,
                event_count: u64::try_from(r.event_count).map_err(|_| bad("negative count"))?,
                personal_data: match r.personal_data {
                    0 => false,
                    1 => true,
                    _ => return Err(bad("personal_data is neither 0 nor 1")),
                },
                correlation_id: r.correlation_id,
                causation_id: r.causation_id,
                purpose: r.purpose,
                request_id: r.request_id,
            },
            prev_hash,
            hash,
        })
    }
}

const HEAD_SQL: &str = "select seq, hash from audit_log order by seq desc limit 1";

fn head_from(row: Option<(i64, Vec<u8>)>) -> Result<(u64, [u8; 32]), StoreError> {
    match row {
        None => Ok((0, GENESIS)),
        Some((seq, hash)) => Ok((
            count(seq)?,
            hash.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt(format!("audit record {seq}: hash is not 32 bytes"))
            })?,
        )),
    }
}

/// The stored hash of record `seq`, inside the writer's transaction.
/// The stored hash of record `seq`, inside the writer's transaction.
pub(super) async fn hash_at(conn: Conn<'_>, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(on_conn!(conn, |c| sqlx::query_scalar(HASH_AT_SQL)
        .bind(to_i64(seq, "audit record")?)
        .fetch_optional(c)
        .await?))
}

const HASH_AT_SQL: &str = "select hash from audit_log where seq = $1";

/// Refuses to extend a chain that no longer holds the last record this
/// process wrote (`anchor`): the newest records were deleted or rewritten.
/// `kept` is the stored hash at the anchor's number when the head is past it.
pub(super) fn check_anchor(
    anchor: Option<(u64, [u8; 32])>,
    head: (u64, [u8; 32]),
    kept: Option<Vec<u8>>,
) -> Result<(), StoreError> {
    let Some((seq, hash)) = anchor else {
        return Ok(());
    };
    let holds = match head.0.cmp(&seq) {
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => head.1 == hash,
        std::cmp::Ordering::Greater => kept.as_deref() == Some(hash.as_slice()),
    };
    if holds {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "the audit log no longer holds record {seq} as this process wrote it (records were deleted or rewritten); no more records are written until an operator has looked"
        )))
    }
}

/// The last record's number and hash, inside the writer's transaction.
/// Number and hash of the last record, inside the writer's transaction.
pub(super) async fn head(conn: Conn<'_>) -> Result<(u64, [u8; 32]), StoreError> {
    head_from(on_conn!(conn, |c| sqlx::query_as(HEAD_SQL)
        .fetch_optional(c)
        .await?))
}

/// Inserts sealed records, inside the writer's transaction.
pub(super) async fn insert(conn: Conn<'_>, records: &[AuditRecord]) -> Result<(), StoreError> {
    match conn {
        Conn::Sqlite(c) => sqlite_insert(c, records).await,
        Conn::Postgres(c) => pg_insert(c, records).await,
    }
}

/// Inserts sealed records in one statement (rows as one JSON array).
async fn sqlite_insert(
    tx: &mut SqliteConnection,
    records: &[AuditRecord],
) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let rows: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            let e = &r.entry;
            serde_json::json!([
                r.seq,
                r.recorded_at_us,
                e.principal,
                e.action,
                e.resource,
                e.outcome.as_str(),
                e.event_count,
                e.personal_data,
                e.correlation_id,
                e.causation_id,
                e.purpose,
                e.request_id,
                hex::encode(r.prev_hash),
                hex::encode(r.hash),
            ])
        })
        .collect();
    sqlx::query(
        "insert into audit_log (seq, recorded_at, principal, action, resource, outcome, event_count, personal_data,
                                correlation_id, causation_id, purpose, request_id, prev_hash, hash)
         select value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7,
                value ->> 8, value ->> 9, value ->> 10, value ->> 11, unhex(value ->> 12), unhex(value ->> 13)
         from json_each($1)",
    )
    .bind(serde_json::to_string(&rows).expect("rows serialise"))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Inserts sealed records in one statement (arrays per column, unnested).
async fn pg_insert(tx: &mut PgConnection, records: &[AuditRecord]) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&AuditRecord) -> Option<String>| records.iter().map(f).collect::<Vec<_>>();
    let seq = records
        .iter()
        .map(|r| to_i64(r.seq, "audit record"))
        .collect::<Result<Vec<_>, _>>()?;
    let recorded_at: Vec<i64> = records.iter().map(|r| r.recorded_at_us).collect();
    let action: Vec<&str> = records.iter().map(|r| r.entry.action.as_str()).collect();
    let resource: Vec<&str> = records.iter().map(|r| r.entry.resource.as_str()).collect();
    let outcome: Vec<&str> = records.iter().map(|r| r.entry.outcome.as_str()).collect();
    let count = records
        .iter()
        .map(|r| to_i64(r.entry.event_count, "event count"))
        .collect::<Result<Vec<_>, _>>()?;
    let personal: Vec<bool> = records.iter().map(|r| r.entry.personal_data).collect();
    let prev: Vec<Vec<u8>> = records.iter().map(|r| r.prev_hash.to_vec()).collect();
    let hash: Vec<Vec<u8>> = records.iter().map(|r| r.hash.to_vec()).collect();
    sqlx::query(
        "insert into audit_log (seq, recorded_at, principal, action, resource, outcome, event_count, personal_data,
                                correlation_id, causation_id, purpose, request_id, prev_hash, hash)
         select * from unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[],
                              $8::boolean[], $9::text[], $10::text[], $11::text[], $12::text[], $13::bytea[], $14::bytea[])",
    )
    .bind(seq)
    .bind(recorded_at)
    .bind(col(|r| r.entry.principal.clone()))
    .bind(action)
    .bind(resource)
    .bind(outcome)
    .bind(count)
    .bind(personal)
    .bind(col(|r| r.entry.correlation_id.clone()))
    .bind(col(|r| r.entry.causation_id.clone()))
    .bind(col(|r| r.entry.purpose.clone()))
    .bind(col(|r| r.entry.request_id.clone()))
    .bind(prev)
    .bind(hash)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Filters of an audit listing; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub principal: Option<String>,
    pub action: Option<String>,
    pub resource: Option<String>,
    pub outcome: Option<Outcome>,
    /// Records at or after this time (µs).
    pub since_us: Option<i64>,
    /// Records before this time (µs).
    pub until_us: Option<i64>,
}

/// Parses `SEQ:HASH` (a record number and its hash in hex), as `audit
/// verify` prints them.
pub fn parse_expectation(s: &str) -> Option<(u64, [u8; 32])> {
    let (seq, hash) = s.split_once(':')?;
    // A record number as the API document gives it: digits without a
    // leading zero (nor sign), at most `i64::MAX` (how records are numbered).
    if seq.len() > 19 || seq.starts_with('0') || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq = seq.parse().ok().filter(|s| *s <= i64::MAX as u64)?;
    let hash = hex::decode(hash).ok()?.try_into().ok()?;
    Some((seq, hash))
}

/// The result of walking the whole chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainReport {
    Intact { records: u64, head_hash: [u8; 32] },
    Broken { first_bad_seq: u64, reason: String },
}

/// Records read per round trip while verifying.
const VERIFY_PAGE: i64 = 5_000;

impl EventStore {
    /// Up to `limit` records after `after`, in order, that match `filter`.
    pub async fn audit_records(
        &self,
        after: u64,
        limit: u32,
        filter: &AuditFilter,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let sqls = select_audit!(
                "where seq > $1
                   and ($2 is null or principal = $2) and ($3 is null or action = $3)
                   and ($4 is null or resource = $4) and ($5 is null or recorded_at >= $5)
                   and ($6 is null or recorded_at < $6) and ($8 is null or outcome = $8)
                 order by seq limit $7",
                "where seq > $1
                   and ($2::text is null or principal = $2) and ($3::text is null or action = $3)
                   and ($4::text is null or resource = $4) and ($5::bigint is null or recorded_at >= $5)
                   and ($6::bigint is null or recorded_at < $6) and ($8::text is null or outcome = $8)
                 order by seq limit $7"
        );
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows: Vec<AuditRow> = on_db_sql!(&self.db, sqls, |pool, sql| {
            sqlx::query_as(sql)
                .bind(after)
                .bind(filter.principal.as_deref())
                .bind(filter.action.as_deref())
                .bind(filter.resource.as_deref())
                .bind(filter.since_us)
                .bind(filter.until_us)
                .bind(i64::from(limit))
                .bind(filter.outcome.map(Outcome::as_str))
                .fetch_all(pool)
                .await
        })?;
        rows.into_iter().map(AuditRecord::try_from).collect()
    }

    /// Walks the whole chain from record 1, a page at a time. With `expect`
    /// (a record number and hash kept from an earlier run), the chain must
    /// still reach that record and it must have that hash: this finds the
    /// newest records cut off, which the chain alone cannot show.
    pub async fn verify_audit_chain(
        &self,
        expect: Option<(u64, [u8; 32])>,
    ) -> Result<ChainReport, StoreError> {
        let sqls = select_audit!("where seq > $1 order by seq limit $2");
        let mut verifier = ChainVerifier::default();
        let mut after = 0i64;
        loop {
            let rows: Vec<AuditRow> = on_db_sql!(&self.db, sqls, |pool, sql| {
                sqlx::query_as(sql)
                    .bind(after)
                    .bind(VERIFY_PAGE)
                    .fetch_all(pool)
                    .await
            })?;
            let Some(last) = rows.last() else {
                let records = verifier.records();
                return Ok(match expect {
                    Some((seq, _)) if seq > records => ChainReport::Broken {
                        first_bad_seq: records + 1,
                        reason: format!(
                            "the chain ends at record {records}, but record {seq} was expected"
                        ),
                    },
                    _ => ChainReport::Intact {
                        records,
                        head_hash: verifier.head_hash(),
                    },
                });
            };
            after = last.seq;
            for row in rows {
                let bad = |reason: &str| ChainReport::Broken {
                    first_bad_seq: verifier.records() + 1,
                    reason: reason.to_owned(),
                };
                if u64::try_from(row.seq).ok() != Some(verifier.records() + 1) {
                    return Ok(bad(Break::Missing.as_str()));
                }
                let record = match AuditRecord::try_from(row) {
                    Ok(r) => r,
                    Err(_) => return Ok(bad("it cannot be read")),
                };
                if let Err((seq, why)) = verifier.check(&record) {
                    return Ok(ChainReport::Broken {
                        first_bad_seq: seq,
                        reason: why.as_str().to_owned(),
                    });
                }
                if let Some((seq, hash)) = expect
                    && seq == record.seq
                    && hash != record.hash
                {
                    return Ok(ChainReport::Broken {
                        first_bad_seq: seq,
                        reason: "its hash is not the one expected".into(),
                    });
                }
            }
        }
    }
}

/// Property tests of `SEQ:HASH`, which operators type in.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// `SEQ:HASH` as documented: a record number from 1 to `i64::MAX`
    /// (decimal digits, no leading zero, no sign) and exactly 64 hex digits
    /// of either case.
    fn expectation_oracle(s: &str) -> Option<(u64, [u8; 32])> {
        let (seq, hash) = s.split_once(':')?;
        let digits = seq;
        if digits.is_empty()
            || digits.starts_with('0')
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let mut n: u64 = 0;
        for b in digits.bytes() {
            n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        }
        if n == 0
            || n > i64::MAX as u64
            || hash.len() != 64
            || !hash.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in hash.as_bytes().chunks(2).enumerate() {
            let digit = |b: u8| (b as char).to_digit(16).unwrap() as u8;
            out[i] = digit(pair[0]) * 16 + digit(pair[1]);
        }
        Some((n, out))
    }

    fn expectations() -> impl Strategy<Value = String> {
        prop_oneof![
            (any::<u64>(), any::<[u8; 32]>(), any::<bool>()).prop_map(|(n, h, upper)| {
                let hex = hex::encode(h);
                format!("{n}:{}", if upper { hex.to_uppercase() } else { hex })
            }),
            "[+-]?[0-9]{0,21}:[0-9a-fA-F]{62,66}",
            "[0-9]{1,3}:[0-9a-fA-F:g ]{60,66}",
            "[0-9]{1,3}[:;]{0,2}[0-9a-f]{64}",
            any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn expectations_parse_exactly_seq_colon_hash(s in expectations()) {
            prop_assert_eq!(parse_expectation(&s), expectation_oracle(&s), "{:?}", s);
        }

        #[test]
        fn printed_expectations_round_trip(seq in 1..=i64::MAX as u64, hash in any::<[u8; 32]>()) {
            let printed = format!("{seq}:{}", hex::encode(hash));
            prop_assert_eq!(parse_expectation(&printed), Some((seq, hash)));
        }
    }
}
