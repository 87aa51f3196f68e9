//! The vocabulary of the event store: validated identifiers and the shapes of
//! events on their way in and out.
//!
//! Parse, don't validate: each newtype has exactly one constructor that checks
//! its input, so a `StreamId` anywhere in the code is known to be well formed.
//! This module knows neither HTTP nor SQL. Times everywhere are microseconds
//! since the Unix epoch, UTC, shown as RFC 3339 ([`rfc3339`]).

use std::fmt;

use serde_json::{Map, Value};
use uuid::Uuid;

/// The most events one append may carry; larger batches are refused whole.
pub const MAX_EVENTS_PER_APPEND: usize = 1000;

/// Longest stream id, subject or event type accepted.
const MAX_NAME_LEN: usize = 200;

/// RFC 3339 with microseconds, UTC.
pub fn rfc3339(us: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Parses an RFC 3339 time into microseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1000).ok()
}

/// A malformed input value, with a message meant for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

fn invalid(msg: impl Into<String>) -> InvalidInput {
    InvalidInput(msg.into())
}

/// Checks a name against the shared alphabet of stream ids and subjects:
/// 1–200 characters of `[A-Za-z0-9._:@-]`.
fn check_name(what: &str, s: &str, extra: &[char]) -> Result<(), InvalidInput> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "{what} must be 1 to {MAX_NAME_LEN} characters long"
        )));
    }
    if let Some(bad) = s.chars().find(|c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') || extra.contains(c))
    }) {
        return Err(invalid(format!(
            "{what} contains {bad:?}; allowed are letters, digits and {}",
            allowed_punctuation(extra)
        )));
    }
    Ok(())
}

fn allowed_punctuation(extra: &[char]) -> String {
    let mut chars = vec!['.', '_', ':', '-'];
    chars.extend_from_slice(extra);
    chars
        .iter()
        .map(|c| format!("'{c}'"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// An event's id, chosen by the client or made by eventvault (UUIDv7).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct EventId(Uuid);

impl EventId {
    pub fn new(id: Uuid) -> Self {
        Self(id)
    }

    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl From<Uuid> for EventId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

impl From<EventId> for Uuid {
    fn from(id: EventId) -> Self {
        id.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Defines a count along a log: a `u64` newtype, `Copy`, ordered, shown and
/// serialised as its number.
macro_rules! counter {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord,
            serde::Serialize, serde::Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(u64);

        impl $name {
            /// The one before the first: nothing yet.
            pub const ZERO: Self = Self(0);

            pub const fn new(n: u64) -> Self {
                Self(n)
            }

            pub const fn get(self) -> u64 {
                self.0
            }

            /// `n` further along, saturating at `u64::MAX`.
            pub const fn plus(self, n: u64) -> Self {
                Self(self.0.saturating_add(n))
            }
        }

        impl From<u64> for $name {
            fn from(n: u64) -> Self {
                Self(n)
            }
        }

        impl From<$name> for u64 {
            fn from(n: $name) -> Self {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

counter!(
    /// An event's place in the global log, 1-based; `Position::ZERO` means
    /// "before the first" (an empty log, a cursor at its start).
    Position
);

counter!(
    /// A stream's version: the number of its events; `Version::ZERO` means
    /// the stream does not exist.
    Version
);

/// Name of a stream: 1–200 characters of `[A-Za-z0-9._:@-]`. Names beginning
/// with `$` are reserved for the system (e.g. `$subjects`) and cannot be
/// produced by [`StreamId::parse`], which refuses `$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct StreamId(String);

impl StreamId {
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        if s.starts_with('$') {
            return Err(invalid(format!(
                "stream id {s:?} is reserved: names starting with '$' belong to the system"
            )));
        }
        check_name("stream id", s, &['@'])?;
        Ok(Self(s.to_owned()))
    }

    /// A stream id to read: like [`StreamId::parse`], but system streams
    /// (`$…`) may be named too (they are written only by eventvault).
    pub fn parse_to_read(s: &str) -> Result<Self, InvalidInput> {
        match s.strip_prefix('$') {
            Some(rest) => {
                check_name("stream id", rest, &['@'])?;
                Ok(Self(s.to_owned()))
            }
            None => Self::parse(s),
        }
    }

    /// The system stream of forget records.
    pub fn subjects_ledger() -> Self {
        Self("$subjects".to_owned())
    }

    /// Trusted conversion for ids read back from the store, which only ever
    /// holds ids that passed [`StreamId::parse`] or system streams.
    pub fn from_store(s: String) -> Self {
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A data subject's pseudonymous id (never a name or an e-mail address): the
/// same alphabet as stream ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Subject(String);

impl Subject {
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        check_name("subject", s, &['@'])?;
        Ok(Self(s.to_owned()))
    }

    /// Trusted conversion for subjects read back from the store, which only
    /// ever holds subjects that passed [`Subject::parse`].
    pub fn from_store(s: String) -> Self {
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event type such as `MoneyDeposited`: 1–200 characters of
/// `[A-Za-z0-9._:-]`, so that it can name a broker subject later.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventType(String);

impl EventType {
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        check_name("event type", s, &[])?;
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What the writer must find before it appends (the `Expected-Version` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the stream's state.
    Any,
    /// The stream must exist (have at least one event).
    Exists,
    /// The stream must be at exactly this version; `0` means it must not exist.
    Exact(u64),
}

impl ExpectedVersion {
    /// Parses the header's value: `any`, `no-stream`, `exists` or a
    /// non-negative integer.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        match s.trim() {
            "any" => Ok(Self::Any),
            "no-stream" => Ok(Self::Exact(0)),
            "exists" => Ok(Self::Exists),
            // Digits only: `u64`'s own reading would also take a `+`.
            other => Some(other)
                .filter(|o| !o.is_empty() && o.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|o| o.parse::<u64>().ok())
                .map(Self::Exact)
                .ok_or_else(|| {
                invalid(format!(
                    "Expected-Version {other:?} is not one of any, no-stream, exists or a non-negative integer"
                ))
            }),
        }
    }

    /// Whether a stream currently at `current` (0 = no stream) satisfies this
    /// expectation.
    pub fn admits(self, current: Version) -> bool {
        match self {
            Self::Any => true,
            Self::Exists => current > Version::ZERO,
            Self::Exact(v) => v == current.get(),
        }
    }
}

/// An event as a client proposes it, validated but not yet classified.
#[derive(Debug, Clone)]
pub struct ProposedEvent {
    pub id: Uuid,
    pub event_type: EventType,
    pub subject: Option<Subject>,
    pub data: Map<String, Value>,
    pub metadata: Map<String, Value>,
}

/// A batch of events for one append, checked for size and unique ids.
#[derive(Debug, Clone)]
pub struct EventBatch(Vec<ProposedEvent>);

impl EventBatch {
    pub fn new(events: Vec<ProposedEvent>) -> Result<Self, InvalidInput> {
        if events.is_empty() {
            return Err(invalid("an append needs at least one event"));
        }
        if events.len() > MAX_EVENTS_PER_APPEND {
            return Err(invalid(format!(
                "an append carries at most {MAX_EVENTS_PER_APPEND} events, this one has {}",
                events.len()
            )));
        }
        let mut seen = std::collections::HashSet::with_capacity(events.len());
        for e in &events {
            if !seen.insert(e.id) {
                return Err(invalid(format!(
                    "event id {} appears more than once in the batch",
                    e.id
                )));
            }
        }
        Ok(Self(events))
    }

    pub fn into_inner(self) -> Vec<ProposedEvent> {
        self.0
    }
}

/// The result of a successful append: where its events landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    pub first_version: Version,
    pub last_version: Version,
    pub first_position: Position,
    pub last_position: Position,
}

/// How much of an event's personal data a reader is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PersonalData {
    /// Personal fields decrypted and shown.
    Decrypted,
    /// The reader may not see personal data: personal fields are absent.
    Redacted,
    /// The subject was forgotten: personal fields are gone for everyone.
    Erased,
    /// The data key is missing from the keystore (restored from a backup
    /// older than the event store, or a replica that was behind) and an
    /// operator accepted the loss (`serve --accept-missing-keys`): the
    /// personal fields cannot be read. Not a forget: the subject was not
    /// forgotten.
    Lost,
    /// The event has no personal fields.
    None,
}

impl PersonalData {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Decrypted => "decrypted",
            Self::Redacted => "redacted",
            Self::Erased => "erased",
            Self::Lost => "lost",
            Self::None => "none",
        }
    }
}

/// An event as a reader receives it, after the access decision.
#[derive(Debug, Clone)]
pub struct ReadEvent {
    pub id: EventId,
    pub stream_id: StreamId,
    pub version: Version,
    pub position: Position,
    pub event_type: String,
    pub subject: Option<Subject>,
    pub data: Map<String, Value>,
    pub metadata: Map<String, Value>,
    pub recorded_at_us: i64,
    pub personal_data: PersonalData,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids() {
        assert!(StreamId::parse("accounts-ACC-1").is_ok());
        assert!(StreamId::parse("a.b_c:d@e-f").is_ok());
        assert!(StreamId::parse(&"x".repeat(200)).is_ok());
        assert!(StreamId::parse(&"x".repeat(201)).is_err());
        assert!(StreamId::parse("").is_err());
        assert!(StreamId::parse("has space").is_err());
        assert!(StreamId::parse("slash/no").is_err());
        assert!(StreamId::parse("ünicode").is_err());
        let reserved = StreamId::parse("$subjects").unwrap_err();
        assert!(reserved.0.contains("reserved"), "{reserved}");
    }

    #[test]
    fn event_types_refuse_at_sign() {
        assert!(EventType::parse("MoneyDeposited").is_ok());
        assert!(EventType::parse("Money@Deposited").is_err());
        assert!(EventType::parse("").is_err());
    }

    #[test]
    fn expected_versions() {
        assert_eq!(ExpectedVersion::parse("any"), Ok(ExpectedVersion::Any));
        assert_eq!(
            ExpectedVersion::parse("no-stream"),
            Ok(ExpectedVersion::Exact(0))
        );
        assert_eq!(
            ExpectedVersion::parse("exists"),
            Ok(ExpectedVersion::Exists)
        );
        assert_eq!(ExpectedVersion::parse("17"), Ok(ExpectedVersion::Exact(17)));
        assert!(ExpectedVersion::parse("-1").is_err());
        assert!(ExpectedVersion::parse("sometimes").is_err());
        assert!(ExpectedVersion::Exists.admits(Version::new(1)));
        assert!(!ExpectedVersion::Exists.admits(Version::ZERO));
        assert!(ExpectedVersion::Exact(0).admits(Version::ZERO));
        assert!(!ExpectedVersion::Exact(2).admits(Version::new(3)));
    }

    fn event(id: u128) -> ProposedEvent {
        ProposedEvent {
            id: Uuid::from_u128(id),
            event_type: EventType::parse("T").unwrap(),
            subject: None,
            data: Map::new(),
            metadata: Map::new(),
        }
    }

    #[test]
    fn batches() {
        assert!(EventBatch::new(vec![]).is_err());
        assert!(EventBatch::new(vec![event(1), event(2)]).is_ok());
        assert!(EventBatch::new(vec![event(1), event(1)]).is_err());
        let too_many = (0..1001).map(event).collect();
        assert!(EventBatch::new(too_many).is_err());
    }
}

/// Property tests of the parsing constructors against oracles written from
/// the documented grammars, not from the code above.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// The documented alphabet of stream ids and subjects, spelt out.
    const NAME_CHARS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@-";

    /// 1–200 characters, each in `alphabet`.
    fn name_in(s: &str, alphabet: &str) -> bool {
        let n = s.chars().count();
        (1..=200).contains(&n) && s.chars().all(|c| alphabet.contains(c))
    }

    fn is_stream_or_subject(s: &str) -> bool {
        name_in(s, NAME_CHARS)
    }

    /// Event types are the same minus `@`.
    fn is_event_type(s: &str) -> bool {
        s.chars().all(|c| c != '@') && name_in(s, NAME_CHARS)
    }

    /// Names near the boundaries of the grammar: valid ones of every length,
    /// the same with one stray character put in, `$`-prefixed ones, and
    /// anything at all.
    fn names() -> impl Strategy<Value = String> {
        let stray = prop_oneof![
            Just('$'),
            Just(' '),
            Just('/'),
            Just('*'),
            Just('\0'),
            Just('ü'),
            Just('\u{212A}'), // Kelvin sign: lowercases to ASCII 'k'
            any::<char>(),
        ];
        prop_oneof![
            "[A-Za-z0-9._:@-]{1,200}",
            "[A-Za-z0-9._:@-]{195,205}",
            ("[A-Za-z0-9._:@-]{0,50}", stray, "[A-Za-z0-9._:@-]{0,50}")
                .prop_map(|(a, c, b)| format!("{a}{c}{b}")),
            "[A-Za-z0-9._:@-]{0,201}".prop_map(|s| format!("${s}")),
            "\\$+[A-Za-z0-9._:@-]{0,3}",
            any::<String>(),
        ]
    }

    /// A name parser's answer: accepted exactly when `valid` (and then the
    /// same text back), refused otherwise with an error naming `what`.
    fn check_name<T: std::fmt::Display>(
        s: &str,
        parsed: Result<T, InvalidInput>,
        valid: bool,
        what: &str,
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        match parsed {
            Ok(v) => {
                prop_assert!(valid, "accepted {s:?}");
                prop_assert_eq!(v.to_string(), s);
            }
            Err(e) => {
                prop_assert!(!valid, "refused {s:?}: {e}");
                prop_assert!(e.0.contains(what), "{e}");
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn stream_id_parse_matches_grammar(s in names()) {
            check_name(&s, StreamId::parse(&s), is_stream_or_subject(&s), "stream id")?;
        }

        #[test]
        fn stream_id_to_read_also_names_system_streams(s in names()) {
            let system = s.strip_prefix('$').is_some_and(is_stream_or_subject);
            match StreamId::parse_to_read(&s) {
                Ok(id) => {
                    prop_assert!(is_stream_or_subject(&s) || system, "accepted {s:?}");
                    prop_assert_eq!(id.as_str(), s.as_str());
                }
                Err(e) => prop_assert!(!is_stream_or_subject(&s) && !system, "refused {s:?}: {e}"),
            }
            // Writing never accepts what only reading may name.
            if system {
                prop_assert!(StreamId::parse(&s).is_err());
            }
        }

        #[test]
        fn subject_parse_matches_grammar(s in names()) {
            check_name(&s, Subject::parse(&s), is_stream_or_subject(&s), "subject")?;
        }

        #[test]
        fn event_type_parse_matches_grammar(s in names()) {
            match EventType::parse(&s) {
                Ok(t) => {
                    prop_assert!(is_event_type(&s), "accepted {s:?}");
                    prop_assert_eq!(t.as_str(), s.as_str());
                }
                Err(e) => prop_assert!(!is_event_type(&s), "refused {s:?}: {e}"),
            }
        }
    }

    /// What `Expected-Version` accepts, from its documentation: after
    /// trimming white space, `any`, `no-stream`, `exists` (exactly so
    /// spelt), or a non-negative integer that fits in 64 bits: decimal
    /// digits only (leading zeros allowed, no sign).
    fn expected_version_oracle(s: &str) -> Option<ExpectedVersion> {
        let t = s.trim_matches(char::is_whitespace);
        match t {
            "any" => return Some(ExpectedVersion::Any),
            "no-stream" => return Some(ExpectedVersion::Exact(0)),
            "exists" => return Some(ExpectedVersion::Exists),
            _ => {}
        }
        let digits = t;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut value: u64 = 0;
        for b in digits.bytes() {
            value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        }
        Some(ExpectedVersion::Exact(value))
    }

    fn expected_version_texts() -> impl Strategy<Value = String> {
        let padding = "[ \t\n\r\u{a0}\u{3000}]{0,2}";
        let core = prop_oneof![
            Just("any".to_owned()),
            Just("no-stream".to_owned()),
            Just("exists".to_owned()),
            Just("Any".to_owned()),
            Just("EXISTS".to_owned()),
            Just("no_stream".to_owned()),
            Just("nostream".to_owned()),
            "[+-]?[0-9]{1,22}",
            any::<u64>().prop_map(|n| n.to_string()),
            Just(u64::MAX.to_string()),
            Just("18446744073709551616".to_owned()),
            "[0-9]{1,3}[ .,e_x][0-9]{1,3}",
            any::<String>(),
        ];
        (padding, core, padding).prop_map(|(a, c, b)| format!("{a}{c}{b}"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn expected_version_accepts_exactly_its_grammar(s in expected_version_texts()) {
            let got = ExpectedVersion::parse(&s);
            match expected_version_oracle(&s) {
                Some(want) => prop_assert_eq!(got, Ok(want), "{:?}", s),
                None => prop_assert!(got.is_err(), "accepted {s:?} as {got:?}"),
            }
        }

        #[test]
        fn expected_version_integers_round_trip(n in any::<u64>()) {
            prop_assert_eq!(ExpectedVersion::parse(&n.to_string()), Ok(ExpectedVersion::Exact(n)));
        }
    }

    fn event(id: u128) -> ProposedEvent {
        ProposedEvent {
            id: Uuid::from_u128(id),
            event_type: EventType::parse("T").unwrap(),
            subject: None,
            data: Map::new(),
            metadata: Map::new(),
        }
    }

    /// Lists of event ids: of every size around the limits, with ids drawn
    /// from a small range (so duplicates happen) or all distinct.
    fn id_lists() -> impl Strategy<Value = Vec<u128>> {
        let len = prop_oneof![0..=4usize, 996..=1004usize, 0..=1000usize];
        (len, any::<bool>(), 0..8u128).prop_map(|(n, distinct, range)| {
            (0..n as u128)
                .map(|i| {
                    if distinct {
                        i
                    } else {
                        (i * 7 + 3) % (range + n as u128 / 2 + 1)
                    }
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn batches_hold_one_to_a_thousand_distinct_events(ids in id_lists()) {
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            sorted.dedup();
            let distinct = sorted.len() == ids.len();
            let sized = (1..=1000).contains(&ids.len());
            match EventBatch::new(ids.iter().copied().map(event).collect()) {
                Ok(batch) => {
                    prop_assert!(sized && distinct, "accepted {} events", ids.len());
                    let kept: Vec<u128> = batch.into_inner().iter().map(|e| e.id.as_u128()).collect();
                    prop_assert_eq!(kept, ids, "the batch keeps the events in order");
                }
                Err(e) => {
                    prop_assert!(!(sized && distinct), "refused {} distinct events: {e}", ids.len());
                    if sized {
                        // The id named is one that really repeats.
                        let named = ids.iter().find(|id| e.0.contains(&Uuid::from_u128(**id).to_string()));
                        let named = named.copied();
                        prop_assert!(named.is_some_and(|id| ids.iter().filter(|x| **x == id).count() > 1), "{e}");
                    }
                }
            }
        }
    }
}
