//! Where the master key lives: `file:PATH` or an RFC 7512 PKCS#11 URI
//! naming a key on a token, `pkcs11:token=<token label>;object=<key label>`.
//!
//! Only what names the key is accepted: a PIN or a module in the URI is
//! refused, so that a URI can be shown (`keys status`, logs, the keystore)
//! without revealing anything, and the PIN has one source alone
//! (`EVENTVAULT_PKCS11_PIN`).

use std::fmt;
use std::path::PathBuf;

use crate::crypto::pkcs11::TokenKeyName;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeyUri {
    /// A file holding the key in base64 (created 0600 on first start).
    File(PathBuf),
    /// A non-extractable AES-256 key on a PKCS#11 token.
    Pkcs11(TokenKeyName),
}

impl MasterKeyUri {
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("file:") {
            // `file:PATH` as the operator writes it (relative to the working
            // directory), and `file:///abs` as RFC 8089 does.
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("a file: master key URI needs a path".into());
            }
            return Ok(Self::File(PathBuf::from(path)));
        }
        let Some(rest) = text.strip_prefix("pkcs11:") else {
            return Err(
                "a master key URI is file:PATH or pkcs11:token=<label>;object=<label>".into(),
            );
        };
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        // No query attribute is taken: a PIN or a module is refused by name.
        if let Some(attr) = query.and_then(|q| q.split('&').find(|a| !a.is_empty())) {
            let name = attr.split_once('=').map_or(attr, |(n, _)| n);
            return Err(match name {
                "pin-value" | "pin-source" => {
                    "the PIN is never part of the URI: set EVENTVAULT_PKCS11_PIN".into()
                }
                "module-path" | "module-name" => {
                    "the module is not part of the URI: use --pkcs11-module".into()
                }
                _ => format!("unsupported pkcs11 URI query attribute {name:?}"),
            });
        }
        let (mut token, mut object) = (None, None);
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let Some((name, value)) = attr.split_once('=') else {
                return Err(format!("pkcs11 URI attribute {attr:?} has no value"));
            };
            let value = percent_decode(value)?;
            let slot = match name {
                "token" => &mut token,
                "object" => &mut object,
                "type" if value == "secret-key" => continue,
                "type" => return Err("the master key is a secret key (type=secret-key)".into()),
                _ => {
                    return Err(format!(
                        "unsupported pkcs11 URI attribute {name:?}: name the key by token and object"
                    ));
                }
            };
            if slot.replace(value).is_some() {
                return Err(format!("pkcs11 URI attribute {name:?} is given twice"));
            }
        }
        match (token, object) {
            (Some(token), Some(object)) if !token.is_empty() && !object.is_empty() => {
                Ok(Self::Pkcs11(TokenKeyName { token, object }))
            }
            _ => Err("a pkcs11 master key URI needs token=<label> and object=<label>".into()),
        }
    }
}

impl fmt::Display for MasterKeyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "file:{}", path.display()),
            Self::Pkcs11(k) => write!(
                f,
                "pkcs11:token={};object={}",
                crate::percent::encode(&k.token),
                crate::percent::encode(&k.object)
            ),
        }
    }
}

/// RFC 3986 percent-decoding of one attribute value (UTF-8), strictly.
fn percent_decode(value: &str) -> Result<String, String> {
    if !crate::percent::is_well_formed(value) {
        return Err(format!(
            "bad percent-encoding in pkcs11 URI value {value:?}"
        ));
    }
    String::from_utf8(crate::percent::decode(value))
        .map_err(|_| "a pkcs11 URI value is not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn token(t: &str, o: &str) -> MasterKeyUri {
        MasterKeyUri::Pkcs11(TokenKeyName {
            token: t.into(),
            object: o.into(),
        })
    }

    #[test]
    fn uris() {
        assert_eq!(
            MasterKeyUri::parse("file:keys/master.key").unwrap(),
            MasterKeyUri::File("keys/master.key".into())
        );
        assert_eq!(
            MasterKeyUri::parse("file:///etc/ev/kek").unwrap(),
            MasterKeyUri::File("/etc/ev/kek".into())
        );
        assert_eq!(
            MasterKeyUri::parse("pkcs11:token=bank%20hsm;object=kek-2026;type=secret-key").unwrap(),
            token("bank hsm", "kek-2026")
        );
        assert_eq!(
            token("bank hsm", "kek;1").to_string(),
            "pkcs11:token=bank%20hsm;object=kek%3B1"
        );
        for (bad, says) in [
            (
                "pkcs11:token=t;object=k?pin-value=1234",
                "EVENTVAULT_PKCS11_PIN",
            ),
            (
                "pkcs11:token=t;object=k?module-path=/x.so",
                "--pkcs11-module",
            ),
            ("pkcs11:token=t", "needs token"),
            ("pkcs11:token=t;object=k;object=j", "twice"),
            ("pkcs11:token=t;object=k;type=private", "secret key"),
            ("pkcs11:token=t;object=k;serial=1", "unsupported"),
            ("pkcs11:token=t%zz;object=k", "percent"),
            ("file:", "needs a path"),
            ("vault:kv/kek", "file:PATH or pkcs11:"),
        ] {
            let err = MasterKeyUri::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(!err.contains("1234"), "a PIN is never repeated: {err}");
        }
    }

    proptest! {
        /// Any labels survive being written as a URI and parsed back.
        #[test]
        fn labels_round_trip(t in "\\PC{1,32}", o in "\\PC{1,32}") {
            let uri = token(&t, &o);
            prop_assert_eq!(MasterKeyUri::parse(&uri.to_string()).unwrap(), uri);
        }

        /// No text makes the parser panic.
        #[test]
        fn never_panics(text in "(pkcs11:|file:)?\\PC{0,64}") {
            let _ = MasterKeyUri::parse(&text);
        }
    }
}
