//! The writer's decisions, without I/O: given what a group's transaction
//! read ([`Snapshot`]), decide every job of the group in order and lay out
//! the rows, stream versions and audit records to write ([`Plan`]).

use std::collections::{HashMap, HashSet};

use super::{AppendCommand, AppendRejection, Appended, Job};
use crate::audit::{AuditRecord, Outcome, seal_records};
use crate::domain::{AppendResult, EventId, Position, StreamId, Subject, Version};
use crate::store::{StoreError, data_keys, now_us};

/// What the group's transaction found before deciding.
pub(super) struct Snapshot {
    /// Number and hash of the last audit record.
    pub(super) audit_head: (u64, [u8; 32]),
    pub(super) head_position: Position,
    pub(super) last_recorded_at: i64,
    pub(super) versions: HashMap<StreamId, Version>,
    pub(super) existing: HashMap<EventId, Existing>,
    /// Subjects of the group's events that are in the forget ledger.
    pub(super) forgotten: HashSet<Subject>,
}

/// Where an already stored (or already planned) event sits.
#[derive(Debug, Clone)]
pub(super) struct Existing {
    pub(super) stream_id: StreamId,
    pub(super) version: Version,
    pub(super) position: Position,
    /// Index within its original append, and that append's size.
    pub(super) append_index: u32,
    pub(super) append_size: u32,
}

/// The rows one group will insert, column by column.
#[derive(Default)]
pub(super) struct Rows {
    pub(super) position: Vec<Position>,
    pub(super) stream_id: Vec<StreamId>,
    pub(super) version: Vec<Version>,
    pub(super) event_id: Vec<EventId>,
    pub(super) event_type: Vec<String>,
    pub(super) subject: Vec<Option<Subject>>,
    pub(super) key_id: Vec<Option<String>>,
    pub(super) data: Vec<String>,
    pub(super) sealed: Vec<Option<Vec<u8>>>,
    pub(super) metadata: Vec<String>,
    pub(super) append_index: Vec<i32>,
    pub(super) append_size: Vec<i32>,
}

impl Rows {
    /// The data keys the group's sealed events refer to, for the key
    /// registry (written in the group's transaction).
    pub(super) fn key_refs(&self) -> Vec<data_keys::KeyRef<'_>> {
        self.key_id
            .iter()
            .zip(&self.subject)
            .filter_map(|(k, s)| {
                Some(data_keys::KeyRef {
                    key_id: k.as_deref()?,
                    subject: s.as_ref()?,
                })
            })
            .collect()
    }
}

/// One job's outcome: `None` for a job without an append.
pub(super) type Outcomes = Vec<Result<Option<Appended>, AppendRejection>>;

/// The group's decisions: one outcome per job, the rows to insert, each
/// touched stream's new version and the chained audit records.
pub(super) struct Plan {
    pub(super) outcomes: Outcomes,
    pub(super) rows: Rows,
    pub(super) streams: Vec<(StreamId, Version)>,
    pub(super) recorded_at: i64,
    pub(super) audit: Vec<AuditRecord>,
}

/// Decides every job of the group in order, as if each had been its own
/// transaction: later appends see the versions and ids of earlier ones.
pub(super) fn plan(jobs: Vec<Job>, mut snap: Snapshot) -> Plan {
    let mut rows = Rows::default();
    let mut touched: Vec<StreamId> = Vec::new();
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut entries = Vec::with_capacity(jobs.len());
    for job in jobs {
        let Job {
            append,
            mut audit,
            describe_append,
        } = job;
        let Some(cmd) = append else {
            outcomes.push(Ok(None));
            entries.push(audit);
            continue;
        };
        let cmd = &cmd;
        let outcome = decide(cmd, &snap);
        if describe_append {
            (audit.outcome, audit.event_count) = match &outcome {
                Ok(Appended::Created(_)) => (Outcome::Ok, cmd.events.len() as u64),
                Ok(Appended::AlreadyAppended(_)) => (Outcome::Ok, 0),
                Err(_) => (Outcome::Error, 0),
            };
        }
        entries.push(audit);
        if let Ok(Appended::Created(r)) = &outcome {
            let stream = &cmd.stream;
            for ((i, e), n) in cmd.events.iter().enumerate().zip(0u64..) {
                let (version, position) = (r.first_version.plus(n), r.first_position.plus(n));
                let (append_index, append_size) = (i as u32, cmd.events.len() as u32);
                snap.existing.insert(
                    e.id,
                    Existing {
                        stream_id: stream.clone(),
                        version,
                        position,
                        append_index,
                        append_size,
                    },
                );
                rows.position.push(position);
                rows.stream_id.push(stream.clone());
                rows.version.push(version);
                rows.event_id.push(e.id);
                rows.event_type.push(e.event_type.clone());
                rows.subject.push(e.subject.clone());
                rows.key_id.push(e.key_id.clone());
                rows.data.push(e.data.clone());
                rows.sealed.push(e.sealed.clone());
                rows.metadata.push(e.metadata.clone());
                rows.append_index.push(append_index as i32);
                rows.append_size.push(append_size as i32);
            }
            snap.versions.insert(stream.clone(), r.last_version);
            if !touched.contains(stream) {
                touched.push(stream.clone());
            }
            snap.head_position = r.last_position;
        }
        outcomes.push(outcome.map(Some));
    }
    let streams = touched
        .into_iter()
        .map(|s| {
            let v = snap.versions[&s];
            (s, v)
        })
        .collect();
    // Times strictly increase along the log, even if the clock steps back, so
    // that an `as_of` read is always a prefix of the log and every commit's
    // time names exactly the state after it.
    let recorded_at = now_us().max(snap.last_recorded_at + 1);
    let (head_seq, head_hash) = snap.audit_head;
    Plan {
        outcomes,
        rows,
        streams,
        recorded_at,
        audit: seal_records(head_seq, head_hash, recorded_at, entries),
    }
}

fn decide(cmd: &AppendCommand, snap: &Snapshot) -> Result<Appended, AppendRejection> {
    let known: Vec<&Existing> = cmd
        .events
        .iter()
        .filter_map(|e| snap.existing.get(&e.id))
        .collect();
    if !known.is_empty() {
        return replay(cmd, &known);
    }
    if let Some(s) = cmd
        .events
        .iter()
        .filter_map(|e| e.subject.as_ref())
        .find(|s| snap.forgotten.contains(*s))
    {
        return Err(AppendRejection::Forgotten(s.clone()));
    }
    let current = snap
        .versions
        .get(&cmd.stream)
        .copied()
        .unwrap_or(Version::ZERO);
    if !cmd.expected.admits(current) {
        return Err(AppendRejection::WrongVersion {
            current: current.get(),
        });
    }
    let n = cmd.events.len() as u64;
    Ok(Appended::Created(AppendResult {
        first_version: current.plus(1),
        last_version: current.plus(n),
        first_position: snap.head_position.plus(1),
        last_position: snap.head_position.plus(n),
    }))
}

/// Some of the command's ids exist already: it is an idempotent retry only if
/// all of them do, in this stream, in this order, one after the other.
fn replay(cmd: &AppendCommand, known: &[&Existing]) -> Result<Appended, AppendRejection> {
    // The other stream is not named: the caller may have no right to know it.
    if known.iter().any(|e| e.stream_id != cmd.stream) {
        return Err(AppendRejection::IdsInUse(
            "event ids of this append are already used in another stream".into(),
        ));
    }
    if known.len() != cmd.events.len() {
        return Err(AppendRejection::IdsInUse(format!(
            "{} of the {} event ids of this append were appended before; a retry must repeat the original append exactly",
            known.len(),
            cmd.events.len()
        )));
    }
    let first = known[0];
    let in_order = known.iter().enumerate().zip(0u64..).all(|((i, e), n)| {
        e.append_index as usize == i
            && e.append_size as usize == known.len()
            && e.version == first.version.plus(n)
            && e.position == first.position.plus(n)
    });
    if !in_order {
        return Err(AppendRejection::IdsInUse(
            "these event ids were appended before in another order or grouping; a retry must repeat the original append exactly".into(),
        ));
    }
    let last = known[known.len() - 1];
    Ok(Appended::AlreadyAppended(AppendResult {
        first_version: first.version,
        last_version: last.version,
        first_position: first.position,
        last_position: last.position,
    }))
}

pub(super) fn distinct_streams(cmds: &[&AppendCommand]) -> Vec<StreamId> {
    let mut s: Vec<StreamId> = cmds.iter().map(|c| c.stream.clone()).collect();
    s.sort();
    s.dedup();
    s
}

pub(super) fn all_subjects(cmds: &[&AppendCommand]) -> Vec<Subject> {
    let mut s: Vec<Subject> = cmds
        .iter()
        .flat_map(|c| c.events.iter().filter_map(|e| e.subject.clone()))
        .collect();
    s.sort();
    s.dedup();
    s
}

pub(super) fn all_ids(cmds: &[&AppendCommand]) -> Vec<EventId> {
    cmds.iter()
        .flat_map(|c| c.events.iter().map(|e| e.id))
        .collect()
}

/// An already stored event as the snapshot queries return it.
pub(super) type ExistingRow = (EventId, StreamId, Version, Position, i32, i32);

/// What the store holds of a group's streams, event ids and subjects, as
/// each backend's queries find it.
#[derive(Default)]
pub(super) struct Found {
    pub versions: Vec<(StreamId, Version)>,
    pub existing: Vec<ExistingRow>,
    pub forgotten: Vec<Subject>,
}

pub(super) fn snapshot_from(
    audit_head: (u64, [u8; 32]),
    head: Option<(Position, i64)>,
    Found {
        versions,
        existing,
        forgotten,
    }: Found,
) -> Result<Snapshot, StoreError> {
    let (head_position, last_recorded_at) = head.unwrap_or((Position::ZERO, 0));
    let existing = existing
        .into_iter()
        .map(
            |(id, stream_id, version, position, append_index, append_size)| {
                let (append_index, append_size) = (append_index as u32, append_size as u32);
                (
                    id,
                    Existing {
                        stream_id,
                        version,
                        position,
                        append_index,
                        append_size,
                    },
                )
            },
        )
        .collect();
    Ok(Snapshot {
        audit_head,
        head_position,
        last_recorded_at,
        versions: versions.into_iter().collect(),
        existing,
        forgotten: forgotten.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditEntry;
    use uuid::Uuid;

    use crate::domain::ExpectedVersion;
    use crate::store::writer::PendingEvent;

    fn stream(s: &str) -> StreamId {
        StreamId::parse(s).unwrap()
    }

    fn subject(s: &str) -> Subject {
        Subject::parse(s).unwrap()
    }

    fn positions(rows: &Rows) -> Vec<u64> {
        rows.position.iter().map(|p| p.get()).collect()
    }

    /// Versions `v` and positions `p`, first and last.
    fn result(v: (u64, u64), p: (u64, u64)) -> AppendResult {
        AppendResult {
            first_version: Version::new(v.0),
            last_version: Version::new(v.1),
            first_position: Position::new(p.0),
            last_position: Position::new(p.1),
        }
    }

    fn cmd(stream: &str, expected: ExpectedVersion, ids: &[u128]) -> AppendCommand {
        AppendCommand {
            stream: StreamId::parse(stream).unwrap(),
            expected,
            events: ids
                .iter()
                .map(|i| PendingEvent {
                    id: EventId::new(Uuid::from_u128(*i)),
                    event_type: "T".into(),
                    subject: None,
                    key_id: None,
                    data: "{}".into(),
                    sealed: None,
                    metadata: "{}".into(),
                })
                .collect(),
        }
    }

    fn jobs(cmds: Vec<AppendCommand>) -> Vec<Job> {
        cmds.into_iter()
            .map(|c| Job {
                append: Some(c),
                audit: AuditEntry::by_the_service("events.append", "stream".into(), Outcome::Ok, 0),
                describe_append: true,
            })
            .collect()
    }

    fn empty() -> Snapshot {
        Snapshot {
            audit_head: (0, crate::audit::GENESIS),
            head_position: Position::ZERO,
            last_recorded_at: 0,
            versions: HashMap::new(),
            existing: HashMap::new(),
            forgotten: Default::default(),
        }
    }

    #[test]
    fn a_group_is_decided_in_order() {
        let cmds = vec![
            cmd("a", ExpectedVersion::Exact(0), &[1, 2]),
            cmd("a", ExpectedVersion::Exact(0), &[3]), // conflicts with the first
            cmd("a", ExpectedVersion::Exact(2), &[4]),
            cmd("b", ExpectedVersion::Exists, &[5]), // b does not exist
            cmd("a", ExpectedVersion::Any, &[1, 2]), // retry of the first
            cmd("b", ExpectedVersion::Any, &[2]),    // id used in a
        ];
        let p = plan(jobs(cmds), empty());
        assert_eq!(
            p.outcomes[0],
            Ok(Some(Appended::Created(result((1, 2), (1, 2)))))
        );
        assert_eq!(
            p.outcomes[1],
            Err(AppendRejection::WrongVersion { current: 2 })
        );
        assert_eq!(
            p.outcomes[2],
            Ok(Some(Appended::Created(result((3, 3), (3, 3)))))
        );
        assert_eq!(
            p.outcomes[3],
            Err(AppendRejection::WrongVersion { current: 0 })
        );
        assert_eq!(
            p.outcomes[4],
            Ok(Some(Appended::AlreadyAppended(result((1, 2), (1, 2)))))
        );
        assert!(matches!(p.outcomes[5], Err(AppendRejection::IdsInUse(_))));
        assert_eq!(positions(&p.rows), vec![1, 2, 3]);
        assert_eq!(p.streams, vec![(stream("a"), Version::new(3))]);
    }

    #[test]
    fn events_about_forgotten_subjects_are_refused_in_the_transaction() {
        let mut forgotten = cmd("a", ExpectedVersion::Any, &[1]);
        forgotten.events[0].subject = Some(subject("gone"));
        let mut other = cmd("a", ExpectedVersion::Any, &[2]);
        other.events[0].subject = Some(subject("here"));
        let mut snap = empty();
        snap.forgotten.insert(subject("gone"));
        let p = plan(jobs(vec![forgotten, other]), snap);
        assert_eq!(
            p.outcomes[0],
            Err(AppendRejection::Forgotten(subject("gone")))
        );
        assert!(matches!(p.outcomes[1], Ok(Some(Appended::Created(_)))));
        assert_eq!(positions(&p.rows), vec![1]);
    }

    #[test]
    fn partial_or_reordered_retries_conflict() {
        let first = plan(
            jobs(vec![cmd("a", ExpectedVersion::Any, &[1, 2, 3])]),
            empty(),
        );
        assert!(first.outcomes[0].is_ok());
        let mut snap = empty();
        snap.head_position = Position::new(3);
        snap.versions.insert(stream("a"), Version::new(3));
        for ((i, n), id) in (0u32..).zip(1u64..).zip([1u128, 2, 3]) {
            let e = Existing {
                stream_id: stream("a"),
                version: Version::new(n),
                position: Position::new(n),
                append_index: i,
                append_size: 3,
            };
            snap.existing.insert(EventId::new(Uuid::from_u128(id)), e);
        }
        let p = plan(
            jobs(vec![
                cmd("a", ExpectedVersion::Any, &[1, 2]),
                cmd("a", ExpectedVersion::Any, &[2, 1, 3]),
                cmd("a", ExpectedVersion::Any, &[3, 9]),
                cmd("a", ExpectedVersion::Exact(0), &[1, 2, 3]),
            ]),
            snap,
        );
        assert!(
            matches!(p.outcomes[0], Err(AppendRejection::IdsInUse(_))),
            "a prefix of the original append is not a retry"
        );
        assert!(matches!(p.outcomes[1], Err(AppendRejection::IdsInUse(_))));
        assert!(matches!(p.outcomes[2], Err(AppendRejection::IdsInUse(_))));
        assert!(
            matches!(p.outcomes[3], Ok(Some(Appended::AlreadyAppended(_)))),
            "a retry wins over its stale expected version"
        );
        assert!(p.rows.position.is_empty());
        assert_eq!(
            p.audit
                .iter()
                .map(|r| (r.seq, r.entry.outcome))
                .collect::<Vec<_>>(),
            vec![
                (1, Outcome::Error),
                (2, Outcome::Error),
                (3, Outcome::Error),
                (4, Outcome::Ok)
            ],
            "every append is audited, rejected ones as errors"
        );
    }
}
