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
use serde_json::{Map, Value};

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
    /// Paths into `data` kept in clear (retained after a forget): a
    /// top-level field (`"amount"`) or a member of an object, its path
    /// dot-separated (`"counterparty.bic"`).
    clear: Vec<String>,
}

/// The clear paths of one event type, as a tree: one node per listed path
/// and per object on the way to one.
#[derive(Debug, Default, Clone)]
struct ClearPaths {
    /// This path is listed: its value is clear when it is a scalar.
    listed: bool,
    /// Members of this path's object that are (or lead to) listed paths.
    members: HashMap<String, ClearPaths>,
}

impl ClearPaths {
    fn insert(&mut self, path: &str) {
        let node = path.split('.').fold(self, |node, segment| {
            node.members.entry(segment.to_owned()).or_default()
        });
        node.listed = true;
    }

    /// The path of the first value of `object` that [`ClearPaths::split`]
    /// would make personal.
    fn personal_path(&self, object: &Map<String, Value>) -> Option<String> {
        for (name, value) in object {
            let Some(node) = self.members.get(name) else {
                return Some(name.clone());
            };
            match value {
                Value::Object(inner) if !node.members.is_empty() => {
                    if let Some(rest) = node.personal_path(inner) {
                        return Some(format!("{name}.{rest}"));
                    }
                }
                Value::Object(_) | Value::Array(_) => return Some(name.clone()),
                _ if node.listed => {}
                _ => return Some(name.clone()),
            }
        }
        None
    }

    fn get(&self, path: &str) -> Option<&ClearPaths> {
        path.split('.')
            .try_fold(self, |node, segment| node.members.get(segment))
    }

    /// Moves every member of `object` into `clear` or `personal`, by the
    /// rules of [`Classification::split`]. A member is clear as a scalar
    /// whose path is listed; an object member on the way to a listed path is
    /// split in turn (an empty one is clear: it holds nothing); any other
    /// value, arrays included, is personal whole.
    fn split(
        &self,
        object: Map<String, Value>,
        clear: &mut Map<String, Value>,
        personal: &mut Map<String, Value>,
    ) {
        for (name, value) in object {
            let Some(node) = self.members.get(&name) else {
                personal.insert(name, value);
                continue;
            };
            match value {
                Value::Object(inner) if !node.members.is_empty() => {
                    if inner.is_empty() {
                        clear.insert(name, Value::Object(inner));
                        continue;
                    }
                    let (mut c, mut p) = (Map::new(), Map::new());
                    node.split(inner, &mut c, &mut p);
                    if !c.is_empty() {
                        clear.insert(name.clone(), Value::Object(c));
                    }
                    if !p.is_empty() {
                        personal.insert(name, Value::Object(p));
                    }
                }
                Value::Object(_) | Value::Array(_) => {
                    personal.insert(name, value);
                }
                scalar if node.listed => {
                    clear.insert(name, scalar);
                }
                scalar => {
                    personal.insert(name, scalar);
                }
            }
        }
    }
}

/// Which parts of `data` are clear, per event type.
#[derive(Debug, Default, Clone)]
pub struct Classification {
    clear: HashMap<String, ClearPaths>,
}

impl Classification {
    /// Whether `path` (a top-level field, or a dot-separated path into
    /// objects) is listed as clear for `event_type`: a scalar there is
    /// stored in clear. Unlisted types and unlisted paths are personal.
    pub fn is_clear(&self, event_type: &str, path: &str) -> bool {
        self.clear
            .get(event_type)
            .and_then(|paths| paths.get(path))
            .is_some_and(|node| node.listed)
    }

    /// Whether `event_type` has an entry (an unlisted type is personal as a
    /// whole).
    pub fn is_listed(&self, event_type: &str) -> bool {
        self.clear.contains_key(event_type)
    }

    /// Splits an event's `data` into its clear and its personal parts. A
    /// value is clear only as a scalar (string, number, boolean, `null`)
    /// whose path is listed; an object is split member by member when
    /// listed paths lead into it (`"counterparty.bic"`), and is otherwise,
    /// like every array, personal whole. An unlisted type is personal
    /// whole. [`merge`] puts the two parts back together exactly.
    pub fn split(
        &self,
        event_type: &str,
        data: Map<String, Value>,
    ) -> (Map<String, Value>, Map<String, Value>) {
        let (mut clear, mut personal) = (Map::new(), Map::new());
        match self.clear.get(event_type) {
            Some(paths) => paths.split(data, &mut clear, &mut personal),
            None => personal = data,
        }
        (clear, personal)
    }

    /// For an event without a subject (which has no key to seal anything
    /// under): the path of the first value of `data` that
    /// [`Classification::split`] would make personal (`payer_name`,
    /// `counterparty.name`: field names only, never a value). `None` when
    /// every value is clear, or when the type is not listed (its events
    /// without a subject are stored in clear, as they declare nothing
    /// personal).
    pub fn personal_path(&self, event_type: &str, data: &Map<String, Value>) -> Option<String> {
        self.clear.get(event_type)?.personal_path(data)
    }
}

/// A personal part that does not fit its clear part: both hold a value at
/// the same path, which no split makes (the stored data is damaged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap;

/// Puts the personal part of an event's data back into its clear part,
/// object by object: the inverse of [`Classification::split`].
pub fn merge(clear: &mut Map<String, Value>, personal: Map<String, Value>) -> Result<(), Overlap> {
    for (name, value) in personal {
        match (clear.get_mut(&name), value) {
            (None, value) => {
                clear.insert(name, value);
            }
            (Some(Value::Object(c)), Value::Object(p)) => merge(c, p)?,
            (Some(_), _) => return Err(Overlap),
        }
    }
    Ok(())
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
        let mut paths = ClearPaths::default();
        for f in spec.clear {
            if f.is_empty() {
                return Err(invalid(
                    path,
                    &text,
                    &event_type,
                    format!("event type {event_type}: an empty field name"),
                ));
            }
            if f.split('.').any(str::is_empty) {
                return Err(invalid(
                    path,
                    &text,
                    &f,
                    format!(
                        "event type {event_type}: {f:?} is not a path: field names separated by single dots"
                    ),
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
            paths.insert(&f);
        }
        clear.insert(event_type, paths);
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
    fn nested_values_are_clear_only_by_listed_paths() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "roles.toml", ROLES);
        write(
            dir.path(),
            "classification.toml",
            "[types.Paid]\nclear = [\"account\", \"amount\", \"counterparty.bic\", \"fx.rate.value\"]\n",
        );
        let c = Policies::load(dir.path()).unwrap().classification;
        let data: Map<String, Value> = serde_json::from_str(
            r#"{"account": {"holder": "Jane Roe"}, "amount": 12345678901234567890.000000000000000001,
                "counterparty": {"bic": "DEUTDEFF", "name": "John Doe", "iban": ["DE89"]},
                "fx": {"rate": {"value": 1.0800, "source": "ECB"}, "note": {}}, "meta": {},
                "tags": ["vip"], "counterparty_note": "x"}"#,
        )
        .unwrap();
        let (clear, personal) = c.split("Paid", data.clone());
        assert_eq!(
            Value::Object(clear.clone()),
            serde_json::json!({"amount": serde_json::from_str::<Value>("12345678901234567890.000000000000000001").unwrap(),
                "counterparty": {"bic": "DEUTDEFF"}, "fx": {"rate": {"value": serde_json::from_str::<Value>("1.0800").unwrap()}}})
        );
        assert_eq!(
            Value::Object(personal.clone()),
            serde_json::json!({"account": {"holder": "Jane Roe"},
                "counterparty": {"name": "John Doe", "iban": ["DE89"]},
                "fx": {"rate": {"source": "ECB"}, "note": {}}, "meta": {}, "tags": ["vip"],
                "counterparty_note": "x"})
        );
        let mut whole = clear;
        merge(&mut whole, personal).unwrap();
        assert_eq!(whole, data);
        assert_eq!(
            serde_json::to_string(&whole["amount"]).unwrap(),
            "12345678901234567890.000000000000000001"
        );
        // An object where a listed path leads through is split; an empty
        // one holds nothing and stays clear.
        let (clear, personal) = c.split("Paid", serde_json::from_str(r#"{"fx": {}}"#).unwrap());
        assert_eq!((clear.len(), personal.len()), (1, 0));
        // The first personal value's path, never a value.
        let path = |json: &str| c.personal_path("Paid", &serde_json::from_str(json).unwrap());
        assert_eq!(
            path(r#"{"amount": "1", "counterparty": {"bic": "B"}}"#),
            None
        );
        assert_eq!(
            path(r#"{"amount": "1", "payer_name": "Jane"}"#).as_deref(),
            Some("payer_name")
        );
        assert_eq!(
            path(r#"{"account": {"holder": "Jane"}}"#).as_deref(),
            Some("account")
        );
        assert_eq!(path(r#"{"account": ["A"]}"#).as_deref(), Some("account"));
        assert_eq!(
            path(r#"{"counterparty": {"bic": "B", "name": "Jane"}}"#).as_deref(),
            Some("counterparty.name")
        );
        assert_eq!(
            path(r#"{"counterparty": {"bic": {"x": 1}}}"#).as_deref(),
            Some("counterparty.bic")
        );
        assert_eq!(
            path(r#"{"counterparty": "Jane"}"#).as_deref(),
            Some("counterparty")
        );
        assert_eq!(path(r#"{"fx": {"rate": {}}}"#), None);
        // Unlisted types are personal whole, and ask nothing of events
        // without a subject.
        let (clear, personal) = c.split("Other", serde_json::from_str(r#"{"amount": 1}"#).unwrap());
        assert_eq!((clear.len(), personal.len()), (0, 1));
        assert_eq!(
            c.personal_path("Other", &serde_json::from_str(r#"{"amount": 1}"#).unwrap()),
            None
        );
        // A name with a dot in it is no path.
        let (clear, _) = c.split(
            "Paid",
            serde_json::from_str(r#"{"counterparty.bic": "B"}"#).unwrap(),
        );
        assert!(clear.is_empty());
        assert!(c.is_clear("Paid", "counterparty.bic") && !c.is_clear("Paid", "counterparty"));
        // Overlapping parts are refused, not merged.
        let mut clear: Map<String, Value> = serde_json::from_str(r#"{"a": 1}"#).unwrap();
        assert_eq!(
            merge(&mut clear, serde_json::from_str(r#"{"a": 2}"#).unwrap()),
            Err(Overlap)
        );
    }

    #[test]
    fn classification_paths_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "roles.toml", ROLES);
        for bad in ["a..b", ".a", "a."] {
            write(
                dir.path(),
                "classification.toml",
                &format!("[types.A]\nclear = [\"x\",\n  \"{bad}\"]\n"),
            );
            let e = Policies::load(dir.path()).unwrap_err().to_string();
            assert!(e.contains("line 3") && e.contains("is not a path"), "{e}");
        }
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
                2 => prop::sample::select(&["x.y", "x.z", "x..y", ".x", "x."][..]).prop_map(str::to_owned),
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
                type_ok
                    && sorted.len() == fields.len()
                    && fields.iter().all(|f| f.split('.').all(|s| !s.is_empty()))
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

    /// JSON values over a few member names, so that paths meet them;
    /// numbers as text no float holds.
    fn json_values() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            "[a-z ]{0,6}".prop_map(Value::String),
            ("-?[1-9][0-9]{0,24}", "[0-9]{0,20}").prop_map(|(i, f)| {
                let text = if f.is_empty() { i } else { format!("{i}.{f}") };
                serde_json::from_str(&text).unwrap()
            }),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::vec(("[abcd]", inner), 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn objects() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::vec(("[abcd]", json_values()), 0..5).prop_map(|m| m.into_iter().collect())
    }

    /// Every value `clear` holds is a scalar at a listed path, and every
    /// object in it is on the way to one.
    fn only_listed_scalars(
        c: &Classification,
        prefix: &str,
        clear: &Map<String, Value>,
    ) -> Result<(), TestCaseError> {
        for (name, value) in clear {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            match value {
                Value::Object(inner) => {
                    let leads = c.clear["T"]
                        .get(&path)
                        .is_some_and(|n| !n.members.is_empty());
                    prop_assert!(leads, "object at {path} in the clear part");
                    only_listed_scalars(c, &path, inner)?;
                }
                Value::Array(_) => prop_assert!(false, "array at {path} in the clear part"),
                _ => prop_assert!(c.is_clear("T", &path), "{path} is not listed"),
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// A split keeps in clear only scalars at listed paths; the two
        /// parts merge back into exactly the data (numbers digit for digit,
        /// through their stored text); and an event without a subject is
        /// refused exactly when something would be personal.
        #[test]
        fn splits_keep_only_listed_scalars_and_merge_back_exactly(
            paths in prop::collection::btree_set("[abcd](\\.[abcd]){0,3}", 0..6),
            data in objects(),
        ) {
            let mut tree = ClearPaths::default();
            for p in &paths {
                tree.insert(p);
            }
            let c = Classification { clear: HashMap::from([("T".to_owned(), tree)]) };
            let (clear, personal) = c.split("T", data.clone());
            only_listed_scalars(&c, "", &clear)?;
            prop_assert_eq!(c.personal_path("T", &data).is_none(), personal.is_empty());
            if let Some(path) = c.personal_path("T", &data) {
                // It names where the personal part starts.
                prop_assert!(personal.contains_key(path.split('.').next().unwrap()), "{}", path);
            }
            // As stored: each part as JSON text, read back.
            let clear_text = serde_json::to_string(&clear).unwrap();
            let personal_text = serde_json::to_vec(&personal).unwrap();
            let mut whole: Map<String, Value> = serde_json::from_str(&clear_text).unwrap();
            merge(&mut whole, serde_json::from_slice(&personal_text).unwrap()).unwrap();
            prop_assert_eq!(&whole, &data);
            prop_assert_eq!(
                serde_json::to_string(&sorted(&Value::Object(whole))).unwrap(),
                serde_json::to_string(&sorted(&Value::Object(data))).unwrap()
            );
        }
    }

    /// `v` with every object's members in name order, to compare texts.
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut members: Vec<(&String, &Value)> = m.iter().collect();
                members.sort_by_key(|(k, _)| *k);
                Value::Object(
                    members
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sorted(v)))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
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
