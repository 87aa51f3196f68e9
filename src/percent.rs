//! RFC 3986 percent-encoding, for the URIs the service reads and writes: the
//! PostgreSQL URLs handed to `pg_dump` ([`crate::backup`]) and the PKCS#11
//! URIs of master keys ([`crate::keys::uri`]).

/// `%XX` escapes decoded (a '%' not followed by two hex digits is kept).
pub fn decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = escape_at(s, i)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Whether every '%' in `s` starts an escape of two hex digits.
pub fn is_well_formed(s: &str) -> bool {
    s.match_indices('%').all(|(i, _)| escape_at(s, i).is_some())
}

/// The byte escaped by the `%XX` at `i`, if it is one.
fn escape_at(s: &str, i: usize) -> Option<u8> {
    s.get(i + 1..i + 3)
        .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|h| u8::from_str_radix(h, 16).ok())
}

/// Every byte but the unreserved characters of RFC 3986 as `%XX`.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(decode("a%20b%zz%4"), b"a b%zz%4");
        assert!(is_well_formed("a%20b") && !is_well_formed("a%2") && !is_well_formed("%+1"));
        assert_eq!(encode("a b/é"), "a%20b%2F%C3%A9");
        assert_eq!(decode(&encode("a b/é;%")), "a b/é;%".as_bytes());
    }
}
