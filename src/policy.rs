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
