//! Policies loaded from `policies/*.toml` at start: which fields of which
//! event types are clear (everything else is personal), and which roles grant
//! which permissions on which streams.
//!
//! A bad policy stops the start with a message naming the file, the line and
//! the problem. Secure by default: an event type without an entry is personal
//! as a whole, and a role without a grant for a stream may do nothing there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

/// A policy file that could not be loaded, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A permission a role can grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    Append,
    Read,
    ReadPersonal,
    Export,
    Forget,
    Audit,
    Admin,
}

impl Permission {
    /// Whether the permission is granted per stream (`append`, `read`,
    /// `read_personal`) rather than everywhere at once.
    pub fn per_stream(self) -> bool {
        matches!(self, Self::Append | Self::Read | Self::ReadPersonal)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Append => "append",
            Self::Read => "read",
            Self::ReadPersonal => "read_personal",
            Self::Export => "export",
            Self::Forget => "forget",
            Self::Audit => "audit",
            Self::Admin => "admin",
        }
    }
}

/// `classification.toml`: per event type, the fields stored in clear.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassificationFile {
    #[serde(default)]
    types: BTreeMap<String, TypeClassification>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TypeClassification {
    /// Fields of `data` kept in clear (retained after a forget).
    clear: Vec<String>,
}

/// Which top-level fields of `data` are clear, per event type.
#[derive(Debug, Default, Clone)]
pub struct Classification {
    clear: HashMap<String, HashSet<String>>,
}

impl Classification {
    /// Whether field `field` of an event of type `event_type` with a subject
    /// is stored in clear. Unlisted types and unlisted fields are personal.
    pub fn is_clear(&self, event_type: &str, field: &str) -> bool {
        self.clear
            .get(event_type)
            .is_some_and(|fields| fields.contains(field))
    }
}

/// `roles.toml`: named roles, each a list of grants.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolesFile {
    roles: BTreeMap<String, RoleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleSpec {
    #[serde(default)]
    description: Option<String>,
    /// Personal reads under this role must state a purpose (`X-Purpose`).
    #[serde(default)]
    require_purpose: bool,
    #[serde(default, rename = "grant")]
    grants: Vec<GrantSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantSpec {
    streams: Vec<String>,
    permissions: Vec<Permission>,
}

/// A stream pattern: an exact id, or a prefix followed by a single `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamPattern {
    Exact(String),
    Prefix(String),
}

impl StreamPattern {
    fn parse(s: &str) -> Result<Self, String> {
        let (body, wildcard) = match s.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (s, false),
        };
        if body.contains('*') {
            return Err(format!("stream pattern {s:?}: '*' may only end a pattern"));
        }
        if !body
            .strip_prefix('$')
            .unwrap_or(body)
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-'))
        {
            return Err(format!(
                "stream pattern {s:?} has characters a stream id cannot have"
            ));
        }
        if !wildcard && body.is_empty() {
            return Err("an empty stream pattern matches nothing".into());
        }
        Ok(if wildcard {
            Self::Prefix(body.to_owned())
        } else {
            Self::Exact(body.to_owned())
        })
    }

    /// Whether the pattern covers `stream`. System streams (`$…`, e.g. the
    /// `$subjects` list of forgotten subjects) are covered only by a pattern
    /// that names them (`$subjects`, `$*`), never by `*` alone.
    pub fn matches(&self, stream: &str) -> bool {
        match self {
            Self::Exact(s) => s == stream,
            Self::Prefix(p) if p.is_empty() => !stream.starts_with('$'),
            Self::Prefix(p) => stream.starts_with(p.as_str()),
        }
    }
}

/// A role: what it may do where.
#[derive(Debug, Clone)]
pub struct Role {
    pub name: String,
    pub description: Option<String>,
    pub require_purpose: bool,
    pub grants: Vec<(Vec<StreamPattern>, HashSet<Permission>)>,
}

impl Role {
    /// Whether this role grants `permission` on `stream` (`None`: a
    /// permission that is not about one stream, such as `forget`).
    pub fn allows(&self, permission: Permission, stream: Option<&str>) -> bool {
        self.grants.iter().any(|(patterns, perms)| {
            perms.contains(&permission)
                && match stream {
                    Some(s) => patterns.iter().any(|p| p.matches(s)),
                    None => true,
                }
        })
    }
}

/// What a reader gets of an event's personal data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Personal fields are left out (`"personal_data":"redacted"`).
    Redacted,
    /// Personal fields are decrypted, if the subject's key still exists.
    Revealed,
}

/// Why events are being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadKind {
    /// Streams and the global log (and, later, snapshots and subscriptions).
    Read,
    /// A subject's export.
    Export,
}

/// What one caller may do: the union of its roles' grants under today's
/// policies (never anything recorded with the event). Unknown role names
/// grant nothing.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    roles: Vec<Arc<Role>>,
}

impl Grants {
    pub fn of(policies: &Policies, role_names: &[String]) -> Self {
        Self {
            roles: role_names
                .iter()
                .filter_map(|r| policies.roles.get(r).cloned())
                .collect(),
        }
    }

    /// Whether some role grants `permission` on `stream` (`None`: a
    /// permission not about one stream).
    pub fn allows(&self, permission: Permission, stream: Option<&str>) -> bool {
        self.roles.iter().any(|r| r.allows(permission, stream))
    }

    /// The one access decision of every read path, per event: `None` when
    /// the caller may not see events of `stream` this way at all, else
    /// whether it sees their personal fields. A read needs `read` on the
    /// stream (and `read_personal` there to see personal fields); an export
    /// (a data subject's own data, GDPR Art. 15) needs `export`, which shows
    /// them.
    pub fn view(&self, how: ReadKind, stream: &str) -> Option<View> {
        match how {
            ReadKind::Read if !self.allows(Permission::Read, Some(stream)) => None,
            ReadKind::Read if self.allows(Permission::ReadPersonal, Some(stream)) => {
                Some(View::Revealed)
            }
            ReadKind::Read => Some(View::Redacted),
            ReadKind::Export if self.allows(Permission::Export, Some(stream)) => {
                Some(View::Revealed)
            }
            ReadKind::Export => None,
        }
    }

    /// [`Grants::view`] for a read.
    pub fn read_view(&self, stream: &str) -> Option<View> {
        self.view(ReadKind::Read, stream)
    }

    /// Whether a read of `stream` (`None`: of any stream) that may disclose
    /// personal data must state a purpose: some role that grants
    /// `read_personal` there requires one.
    pub fn purpose_required(&self, stream: Option<&str>) -> bool {
        self.roles
            .iter()
            .any(|r| r.require_purpose && r.allows(Permission::ReadPersonal, stream))
    }
}

/// Everything loaded from the policies directory.
#[derive(Debug, Clone)]
pub struct Policies {
    pub classification: Classification,
    pub roles: HashMap<String, Arc<Role>>,
}

impl Policies {
    /// Loads and validates `classification.toml` and `roles.toml` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let classification = load_classification(&dir.join("classification.toml"))?;
        let roles = load_roles(&dir.join("roles.toml"))?;
        Ok(Self {
            classification,
            roles,
        })
    }

    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name).map(|r| &**r)
    }
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, PolicyError> {
    // toml's message already says "at line L, column C" and quotes the line.
    toml::from_str(text).map_err(|e| PolicyError::Invalid {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Line (1-based) on which `needle` first appears, for messages about
/// semantic problems that the TOML parser cannot place.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map_or(1, |i| i + 1)
}

fn invalid(path: &Path, text: &str, needle: &str, problem: String) -> PolicyError {
    PolicyError::Invalid {
        path: path.to_owned(),
        message: format!("line {}: {problem}", line_of(text, needle)),
    }
}

fn load_classification(path: &Path) -> Result<Classification, PolicyError> {
    let text = read(path)?;
    let file: ClassificationFile = parse_toml(path, &text)?;
    let mut clear = HashMap::new();
    for (event_type, spec) in file.types {
        if crate::domain::EventType::parse(&event_type).is_err() {
            return Err(invalid(
                path,
                &text,
                &event_type,
                format!("{event_type:?} is not a valid event type"),
            ));
        }
        let mut fields = HashSet::new();
        for f in spec.clear {
            if f.is_empty() {
                return Err(invalid(
                    path,
                    &text,
                    &event_type,
                    format!("event type {event_type}: an empty field name"),
                ));
            }
            if !fields.insert(f.clone()) {
                return Err(invalid(
                    path,
                    &text,
                    &f,
                    format!("event type {event_type}: field {f:?} is listed twice"),
                ));
            }
        }
        clear.insert(event_type, fields);
    }
    Ok(Classification { clear })
}

fn load_roles(path: &Path) -> Result<HashMap<String, Arc<Role>>, PolicyError> {
    let text = read(path)?;
    let file: RolesFile = parse_toml(path, &text)?;
    let mut roles = HashMap::new();
    for (name, spec) in file.roles {
        let mut grants = Vec::new();
        for g in spec.grants {
            if g.streams.is_empty() || g.permissions.is_empty() {
                return Err(invalid(
                    path,
                    &text,
                    &name,
                    format!("role {name}: a grant needs streams and permissions"),
                ));
            }
            let patterns = g
                .streams
                .iter()
                .map(|s| {
                    StreamPattern::parse(s)
                        .map_err(|m| invalid(path, &text, s, format!("role {name}: {m}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            // Permissions that are not about one stream cannot be limited to
            // some streams: such a grant would give them everywhere.
            if let Some(p) = g.permissions.iter().find(|p| !p.per_stream())
                && patterns
                    .iter()
                    .any(|s| *s != StreamPattern::Prefix(String::new()))
            {
                return Err(invalid(
                    path,
                    &text,
                    &name,
                    format!(
                        "role {name}: '{}' is not about one stream; grant it on streams = [\"*\"] only",
                        p.as_str()
                    ),
                ));
            }
            grants.push((patterns, g.permissions.into_iter().collect()));
        }
        roles.insert(
            name.clone(),
            Arc::new(Role {
                name,
                description: spec.description,
                require_purpose: spec.require_purpose,
                grants,
            }),
        );
    }
    Ok(roles)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    const ROLES: &str = "[roles.admin]\n[[roles.admin.grant]]\nstreams = [\"*\"]\npermissions = [\"append\", \"read\"]\n";

    #[test]
    fn shipped_policies_load() {
        let p =
            Policies::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"))).unwrap();
        assert!(p.classification.is_clear("MoneyDeposited", "amount"));
        assert!(!p.classification.is_clear("MoneyDeposited", "payer_name"));
        assert!(!p.classification.is_clear("NoSuchType", "amount"));
        for role in ["service", "support", "dpo", "auditor", "admin"] {
            assert!(p.role(role).is_some(), "role {role}");
        }
    }

    #[test]
    fn errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "roles.toml", ROLES);
        write(
            dir.path(),
            "classification.toml",
            "[types.A]\nclear = [\"x\"]\n\n[types.B]\nclear = \"oops\"\n",
        );
        let e = Policies::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("classification.toml") && e.contains("line 5"),
            "{e}"
        );

        write(
            dir.path(),
            "classification.toml",
            "[types.A]\nclear = [\"x\", \"x\"]\n",
        );
        let e = Policies::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("listed twice"), "{e}");

        write(dir.path(), "classification.toml", "");
        write(
            dir.path(),
            "roles.toml",
            "[roles.a]\n[[roles.a.grant]]\nstreams = [\"*\"]\npermissions = [\"fly\"]\n",
        );
        let e = Policies::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("roles.toml") && e.contains("line 4") && e.contains("fly"),
            "{e}"
        );

        write(
            dir.path(),
            "roles.toml",
            "[roles.a]\n[[roles.a.grant]]\nstreams = [\"a*b\"]\npermissions = [\"read\"]\n",
        );
        let e = Policies::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");

        write(
            dir.path(),
            "roles.toml",
            "[roles.a]\n[[roles.a.grant]]\nstreams = [\"*\"]\npermissions = [\"read\"]\n\n[roles.narrow]\n[[roles.narrow.grant]]\nstreams = [\"accounts-*\"]\npermissions = [\"audit\"]\n",
        );
        let e = Policies::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("line 6") && e.contains("'audit' is not about one stream"),
            "{e}"
        );
    }

    #[test]
    fn roles_deny_by_default() {
        let p =
            Policies::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"))).unwrap();
        let service = p.role("service").unwrap();
        assert!(service.allows(Permission::Append, Some("accounts-1")));
        assert!(
            !service.allows(Permission::Append, Some("loans-1")),
            "no grant for that stream"
        );
        assert!(
            !service.allows(Permission::ReadPersonal, Some("accounts-1")),
            "no grant for that permission"
        );
        assert!(!service.allows(Permission::Forget, None));
        assert!(p.role("dpo").unwrap().allows(Permission::Forget, None));
        assert!(
            !p.role("auditor")
                .unwrap()
                .allows(Permission::Read, Some("accounts-1"))
        );
        assert!(p.role("support").unwrap().require_purpose);
    }

    #[test]
    fn patterns() {
        let p = StreamPattern::parse("accounts-*").unwrap();
        assert!(p.matches("accounts-1") && !p.matches("loans-1"));
        assert!(StreamPattern::parse("*").unwrap().matches("anything"));
        assert!(!StreamPattern::parse("*").unwrap().matches("$subjects"));
        assert!(StreamPattern::parse("$*").unwrap().matches("$subjects"));
        assert!(StreamPattern::parse("exact").unwrap().matches("exact"));
        assert!(!StreamPattern::parse("exact").unwrap().matches("exactly"));
    }
}

/// Property tests of policy loading: any text either loads or is refused
/// with the file's name, and generated policies load exactly when they
/// follow the rules written in the files' headers.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const SHIPPED_ROLES: &str = include_str!("../policies/roles.toml");
    const SHIPPED_CLASSIFICATION: &str = include_str!("../policies/classification.toml");

    /// Loads `classification` and `roles` from a fresh directory; on error,
    /// also returns the path the error must name.
    fn load(
        classification: &str,
        roles: &str,
    ) -> (Result<Policies, PolicyError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("classification.toml"), classification).unwrap();
        std::fs::write(dir.path().join("roles.toml"), roles).unwrap();
        (Policies::load(dir.path()), dir)
    }

    /// The refusal names `file` (as the start of the message) and, where it
    /// gives a line, one that exists.
    fn check_refusal(
        e: &PolicyError,
        dir: &Path,
        file: &str,
        text: &str,
    ) -> Result<(), TestCaseError> {
        let msg = e.to_string();
        let prefix = format!("{}: ", dir.join(file).display());
        prop_assert!(msg.starts_with(&prefix), "{msg}");
        if let Some((_, after)) = msg.split_once("line ") {
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse::<usize>() {
                prop_assert!(
                    n >= 1 && n <= text.lines().count().max(1) + 1,
                    "line {n} of {} in {msg}",
                    text.lines().count()
                );
            }
        }
        Ok(())
    }

    /// Text that is TOML-like often enough to reach the loader's own checks.
    fn toml_like() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("[types.A]\n"),
            Just("[types.\"a b\"]\n"),
            Just("clear = [\"x\", \"y\"]\n"),
            Just("clear = [\"x\", \"x\"]\n"),
            Just("clear = [\"\"]\n"),
            Just("clear = \"x\"\n"),
            Just("[roles.r]\n"),
            Just("description = \"d\"\n"),
            Just("require_purpose = true\n"),
            Just("[[roles.r.grant]]\n"),
            Just("streams = [\"*\"]\n"),
            Just("streams = [\"a*b\", \"$*\"]\n"),
            Just("streams = []\n"),
            Just("permissions = [\"read\", \"audit\"]\n"),
            Just("permissions = [\"fly\"]\n"),
            Just("# comment\n"),
            Just("\n"),
            Just("["),
            Just("]"),
            Just("\""),
            Just("="),
            Just("'''"),
        ]
        .prop_map(str::to_owned);
        prop_oneof![
            prop::collection::vec(prop_oneof![piece, ".{0,6}"], 0..24).prop_map(|p| p.concat()),
            any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_classification_text_loads_or_names_the_file(text in toml_like()) {
            let (loaded, dir) = load(&text, SHIPPED_ROLES);
            if let Err(e) = loaded {
                check_refusal(&e, dir.path(), "classification.toml", &text)?;
            }
        }

        #[test]
        fn any_roles_text_loads_or_names_the_file(text in toml_like()) {
            let (loaded, dir) = load(SHIPPED_CLASSIFICATION, &text);
            if let Err(e) = loaded {
                check_refusal(&e, dir.path(), "roles.toml", &text)?;
            }
        }
    }

    /// A TOML basic string holding exactly `s`.
    fn quoted(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c < ' ' || c == '\u{7f}' => out.push_str(&format!("\\u{:04X}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    fn list(items: &[String]) -> String {
        let items: Vec<String> = items.iter().map(|s| quoted(s)).collect();
        format!("[{}]", items.join(", "))
    }

    const NAME_CHARS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@-";

    /// Event type names: mostly valid, some not.
    fn type_names() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[A-Za-z][A-Za-z0-9._:-]{0,10}",
            1 => "[A-Za-z@ $\"\\\\\n]{0,4}",
            1 => any::<String>(),
        ]
    }

    fn field_lists() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(
            prop_oneof![
                3 => "[a-z_]{1,6}",
                2 => prop::sample::select(&["x", "y"][..]).prop_map(str::to_owned),
                1 => Just(String::new()),
                1 => ".{1,4}",
            ],
            0..5,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// `classification.toml`: valid event types, each field named
        /// (non-empty) once; a listed field is clear, anything else personal.
        #[test]
        fn classification_loads_exactly_when_valid(
            types in prop::collection::btree_map(type_names(), field_lists(), 0..5)
        ) {
            let mut text = String::from("# generated\n");
            for (name, fields) in &types {
                text.push_str(&format!("[types.{}]\nclear = {}\n\n", quoted(name), list(fields)));
            }
            let valid = types.iter().all(|(name, fields)| {
                let type_ok = (1..=200).contains(&name.chars().count())
                    && name.chars().all(|c| c != '@' && NAME_CHARS.contains(c));
                let mut sorted = fields.clone();
                sorted.sort();
                sorted.dedup();
                type_ok && sorted.len() == fields.len() && fields.iter().all(|f| !f.is_empty())
            });
            let (loaded, dir) = load(&text, SHIPPED_ROLES);
            match loaded {
                Ok(p) => {
                    prop_assert!(valid, "loaded {text}");
                    for (name, fields) in &types {
                        for f in fields {
                            prop_assert!(p.classification.is_clear(name, f));
                        }
                        prop_assert!(!p.classification.is_clear(name, "not-listed"));
                    }
                    prop_assert!(!p.classification.is_clear("NotListed", "x"));
                }
                Err(e) => {
                    prop_assert!(!valid, "refused {text}: {e}");
                    check_refusal(&e, dir.path(), "classification.toml", &text)?;
                    prop_assert!(e.to_string().contains("line "), "{e}");
                }
            }
        }
    }

    const PERMISSIONS: [&str; 7] = [
        "append",
        "read",
        "read_personal",
        "export",
        "forget",
        "audit",
        "admin",
    ];

    fn permission_names() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => prop::sample::select(&PERMISSIONS[..]).prop_map(str::to_owned),
            1 => prop::sample::select(&["fly", "Read", "", "read "][..]).prop_map(str::to_owned),
        ]
    }

    fn stream_patterns() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => Just("*".to_owned()),
            4 => "\\$?[a-z@.:_-]{0,6}\\*?",
            1 => "[a-z*$ /]{0,4}",
            1 => ".{0,3}",
        ]
    }

    /// A grant: its stream patterns and permissions.
    type Grant = (Vec<String>, Vec<String>);

    fn grants() -> impl Strategy<Value = Vec<Grant>> {
        prop::collection::vec(
            (
                prop::collection::vec(stream_patterns(), 0..3),
                prop::collection::vec(permission_names(), 0..3),
            ),
            0..3,
        )
    }

    /// The pattern rule of `roles.toml`'s header: an exact stream id (a
    /// system one may start with `$`) or a prefix ending in a single `*`.
    fn pattern_ok(p: &str) -> bool {
        let (body, wildcard) = match p.strip_suffix('*') {
            Some(b) => (b, true),
            None => (p, false),
        };
        let chars = body.strip_prefix('$').unwrap_or(body);
        chars.chars().all(|c| NAME_CHARS.contains(c)) && (wildcard || !body.is_empty())
    }

    /// Whether a valid pattern covers `stream`: `*` alone covers every
    /// stream but system ones.
    fn covers(p: &str, stream: &str) -> bool {
        match p.strip_suffix('*') {
            Some("") => !stream.starts_with('$'),
            Some(prefix) => stream.starts_with(prefix),
            None => p == stream,
        }
    }

    fn grant_ok((streams, permissions): &Grant) -> bool {
        !streams.is_empty()
            && !permissions.is_empty()
            && permissions.iter().all(|p| PERMISSIONS.contains(&p.as_str()))
            && streams.iter().all(|s| pattern_ok(s))
            // Permissions that are not about one stream go on "*" only.
            && (permissions
                .iter()
                .all(|p| ["append", "read", "read_personal"].contains(&p.as_str()))
                || streams.iter().all(|s| s == "*"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn roles_load_exactly_when_valid(
            roles in prop::collection::btree_map(
                "[a-z$\" ]{1,6}",
                (prop::option::of(".{0,8}"), any::<bool>(), grants()),
                0..4,
            ),
            probe in "\\$?[a-z@.:_-]{0,6}",
        ) {
            let mut text = String::new();
            for (name, (description, purpose, grants)) in &roles {
                text.push_str(&format!("[roles.{}]\n", quoted(name)));
                if let Some(d) = description {
                    text.push_str(&format!("description = {}\n", quoted(d)));
                }
                text.push_str(&format!("require_purpose = {purpose}\n"));
                for (streams, permissions) in grants {
                    text.push_str(&format!(
                        "[[roles.{}.grant]]\nstreams = {}\npermissions = {}\n",
                        quoted(name),
                        list(streams),
                        list(permissions)
                    ));
                }
                text.push('\n');
            }
            if roles.is_empty() {
                text.push_str("[roles]\n");
            }
            let valid = roles.values().all(|(_, _, grants)| grants.iter().all(grant_ok));
            let (loaded, dir) = load(SHIPPED_CLASSIFICATION, &text);
            match loaded {
                Ok(p) => {
                    prop_assert!(valid, "loaded {text}");
                    prop_assert_eq!(p.roles.len(), roles.len());
                    for (name, (description, purpose, grants)) in &roles {
                        let role = p.role(name).unwrap();
                        prop_assert_eq!(&role.description, description);
                        prop_assert_eq!(role.require_purpose, *purpose);
                        let mut streams: Vec<&str> = grants.iter().flat_map(|g| g.0.iter().map(String::as_str)).collect();
                        streams.extend([probe.as_str(), "$subjects", "x"]);
                        for stream in streams {
                            for perm in ["append", "read", "read_personal"] {
                                let want = grants.iter().any(|(s, ps)| {
                                    ps.iter().any(|x| x == perm) && s.iter().any(|s| covers(s, stream))
                                });
                                let permission: Permission = toml::Value::String(perm.into()).try_into().unwrap();
                                prop_assert_eq!(role.allows(permission, Some(stream)), want, "{} {} {}", name, perm, stream);
                            }
                        }
                    }
                }
                Err(e) => {
                    prop_assert!(!valid, "refused {text}: {e}");
                    check_refusal(&e, dir.path(), "roles.toml", &text)?;
                    prop_assert!(e.to_string().contains("line "), "{e}");
                }
            }
        }
    }
}
