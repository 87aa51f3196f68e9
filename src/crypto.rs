//! All cryptography of the service, and the only module that sees key bytes.
//!
//! Keys, all AES-256-GCM:
//! - the master key-encryption key ([`Kek`]) wraps data keys;
//! - one data-encryption key ([`Dek`]) per data subject seals that subject's
//!   personal fields;
//! - a fresh key per snapshot seals its state, and is wrapped under the data
//!   key of every subject of its stream, one layer inside the other, so that
//!   destroying any one of those keys leaves it sealed for good
//!   ([`seal_snapshot_for`]). It never leaves this module.
//!
//! The public operations are seal/open and wrap/unwrap. Nonces are made inside
//! `seal`/`wrap` from `ring`'s system random generator and never passed in.
//! Associated data binds every ciphertext to where it belongs (event id,
//! stream, type, key id; or key id and subject for a wrapped key), so a blob
//! moved to another row fails to open. Every failure to open is the same
//! opaque [`CryptoError::Integrity`]: a caller learns nothing about why.
//!
//! Key types have no `Debug`, are never serialised, and zeroize on drop (the
//! `aes-gcm` cipher state is built with its `zeroize` feature).

pub mod pkcs11;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// First byte of every blob this module produces; a later format bumps it.
const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;

const EVENT_AAD_LABEL: &[u8] = b"eventvault/event/v1";
const SNAPSHOT_AAD_LABEL: &[u8] = b"eventvault/snapshot/v1";
const SNAPSHOT_STATE_AAD_LABEL: &[u8] = b"eventvault/snapshot/v2";
const SNAPSHOT_KEY_AAD_LABEL: &[u8] = b"eventvault/snapshot-key/v1";
const DEK_AAD_LABEL: &[u8] = b"eventvault/dek/v1";
const KEK_CHECK_LABEL: &[u8] = b"eventvault/kek-check/v1";
const KEK_ID_LABEL: &[u8] = b"eventvault/kek-id/v1";

/// The one error of this module. Deliberately says nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// A blob failed to open: wrong key, wrong place, truncated or altered.
    #[error("integrity check failed")]
    Integrity,
    /// The operating system's random generator failed.
    #[error("random generator unavailable")]
    Random,
    /// Key material of the wrong length or encoding.
    #[error("malformed key material")]
    MalformedKey,
    /// The token that holds the master key did not do the operation (it is
    /// gone, busy or failing): nothing is known about the blob.
    #[error("the master key's token is unavailable")]
    Unavailable,
}

fn random_bytes<const N: usize>() -> Result<Zeroizing<[u8; N]>, CryptoError> {
    let mut buf = Zeroizing::new([0u8; N]);
    SystemRandom::new()
        .fill(buf.as_mut())
        .map_err(|_| CryptoError::Random)?;
    Ok(buf)
}

/// Builds associated data as a label followed by length-prefixed fields, so
/// that no two different field lists can encode to the same bytes.
fn aad(label: &[u8], fields: &[&[u8]]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(label.len() + fields.iter().map(|f| f.len() + 4).sum::<usize>());
    out.extend_from_slice(label);
    for f in fields {
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// AES-256-GCM under some key: in this process (`aes-gcm`), or inside a
/// hardware token, which holds the master key and never gives it out
/// ([`pkcs11`]). The nonce is made by [`seal_with`], never by a caller.
pub(crate) trait Gcm: Send + Sync {
    /// Ciphertext and tag of `plaintext`.
    fn encrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError>;
    /// The plaintext, or [`CryptoError::Integrity`] for any blob that does
    /// not open.
    fn decrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError>;
}

impl Gcm for Aes256Gcm {
    fn encrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let nonce = Nonce::try_from(&nonce[..]).map_err(|_| CryptoError::Random)?;
        Aead::encrypt(
            self,
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Integrity)
    }

    fn decrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let nonce = Nonce::try_from(&nonce[..]).map_err(|_| CryptoError::Integrity)?;
        Aead::decrypt(
            self,
            &nonce,
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Integrity)
    }
}

/// AES-256-GCM sealing shared by every key kind:
/// `version byte | 96-bit random nonce | ciphertext and tag`.
fn seal_with(
    cipher: &(impl Gcm + ?Sized),
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let nonce = random_bytes::<NONCE_LEN>()?;
    let ct = cipher.encrypt(&nonce, plaintext, aad)?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&nonce[..]);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn open_with(
    cipher: &(impl Gcm + ?Sized),
    blob: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if blob.len() < 1 + NONCE_LEN + TAG_LEN || blob[0] != FORMAT_V1 {
        return Err(CryptoError::Integrity);
    }
    let nonce: [u8; NONCE_LEN] = blob[1..1 + NONCE_LEN]
        .try_into()
        .map_err(|_| CryptoError::Integrity)?;
    cipher.decrypt(&nonce, &blob[1 + NONCE_LEN..], aad)
}

fn cipher_from(key: &[u8]) -> Result<Aes256Gcm, CryptoError> {
    Aes256Gcm::new_from_slice(key).map_err(|_| CryptoError::MalformedKey)
}

/// Where an event's sealed personal data belongs; all of it is bound into
/// the ciphertext as associated data.
pub struct EventAad<'a> {
    pub event_id: &'a [u8; 16],
    pub stream_id: &'a str,
    pub event_type: &'a str,
    pub key_id: &'a str,
}

impl EventAad<'_> {
    fn encode(&self) -> Vec<u8> {
        aad(
            EVENT_AAD_LABEL,
            &[
                self.event_id,
                self.stream_id.as_bytes(),
                self.event_type.as_bytes(),
                self.key_id.as_bytes(),
            ],
        )
    }
}

/// Where a snapshot's state sealed under one data key ([`Dek::seal_snapshot`],
/// the earlier form) belongs: its stream, the version it folds and its key,
/// bound into the ciphertext as associated data.
pub struct SnapshotAad<'a> {
    pub stream_id: &'a str,
    pub version: u64,
    pub key_id: &'a str,
}

impl SnapshotAad<'_> {
    fn encode(&self) -> Vec<u8> {
        aad(
            SNAPSHOT_AAD_LABEL,
            &[
                self.stream_id.as_bytes(),
                &self.version.to_be_bytes(),
                self.key_id.as_bytes(),
            ],
        )
    }
}

/// Where a snapshot sealed for the subjects of its stream belongs: its
/// stream, the version it folds, and the ids of the subjects' data keys in
/// the order of the layers (innermost first). All of it is bound into the
/// state's ciphertext and into every layer, so neither can be moved to
/// another stream or version, and no layer can be removed, added or
/// reordered.
pub struct SnapshotLayers<'a> {
    pub stream_id: &'a str,
    pub version: u64,
    pub key_ids: &'a [&'a str],
}

impl SnapshotLayers<'_> {
    fn fields(&self) -> Vec<&[u8]> {
        let mut fields: Vec<&[u8]> = vec![self.stream_id.as_bytes()];
        fields.extend(self.key_ids.iter().map(|k| k.as_bytes()));
        fields
    }

    fn state(&self) -> Vec<u8> {
        let version = self.version.to_be_bytes();
        let mut fields = vec![&version[..]];
        fields.extend(self.fields());
        aad(SNAPSHOT_STATE_AAD_LABEL, &fields)
    }

    fn layer(&self, index: usize) -> Vec<u8> {
        let version = self.version.to_be_bytes();
        let index = (index as u32).to_be_bytes();
        let mut fields = vec![&version[..], &index[..]];
        fields.extend(self.fields());
        aad(SNAPSHOT_KEY_AAD_LABEL, &fields)
    }
}

/// A snapshot's state sealed under a key of its own, and that key wrapped
/// under every subject's data key.
pub struct SealedSnapshot {
    /// The snapshot key, wrapped under `deks[0]`, that under `deks[1]`, …
    pub wrapped_key: Vec<u8>,
    /// The state, sealed under the snapshot key.
    pub sealed: Vec<u8>,
}

/// Seals a snapshot's state so that it opens only while every one of
/// `deks` exists: a fresh random key seals the state, and is wrapped under
/// `deks[0]`, the result under `deks[1]`, and so on (each layer is
/// AES-256-GCM with a fresh nonce, as everywhere). Destroying any one data
/// key (a forget) leaves the snapshot key out of reach for good, even for
/// someone holding all the other keys. `deks` pairs with `at.key_ids`, and
/// holds at least one key.
pub fn seal_snapshot_for(
    deks: &[&Dek],
    at: &SnapshotLayers<'_>,
    plaintext: &[u8],
) -> Result<SealedSnapshot, CryptoError> {
    if deks.is_empty() || deks.len() != at.key_ids.len() {
        return Err(CryptoError::MalformedKey);
    }
    let key = random_bytes::<KEY_LEN>()?;
    let sealed = seal_with(&cipher_from(&key[..])?, plaintext, &at.state())?;
    let mut wrapped = Zeroizing::new(key.to_vec());
    for (i, dek) in deks.iter().enumerate() {
        wrapped = Zeroizing::new(seal_with(&dek.cipher, &wrapped, &at.layer(i))?);
    }
    Ok(SealedSnapshot {
        wrapped_key: wrapped.to_vec(),
        sealed,
    })
}

/// Opens a snapshot made by [`seal_snapshot_for`] with the same keys in the
/// same order; any mismatch is [`CryptoError::Integrity`].
pub fn open_snapshot_for(
    deks: &[&Dek],
    at: &SnapshotLayers<'_>,
    wrapped_key: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if deks.is_empty() || deks.len() != at.key_ids.len() {
        return Err(CryptoError::Integrity);
    }
    let mut inner = Zeroizing::new(wrapped_key.to_vec());
    for (i, dek) in deks.iter().enumerate().rev() {
        inner = open_with(&dek.cipher, &inner, &at.layer(i))?;
    }
    if inner.len() != KEY_LEN {
        return Err(CryptoError::Integrity);
    }
    let cipher = cipher_from(&inner).map_err(|_| CryptoError::Integrity)?;
    open_with(&cipher, sealed, &at.state())
}

/// A data subject's data-encryption key. No `Debug`, no `Clone`, zeroized on
/// drop; shared between tasks only behind an `Arc`.
pub struct Dek {
    cipher: Aes256Gcm,
}

impl Dek {
    /// Seals an event's personal fields.
    pub fn seal_event(&self, plaintext: &[u8], at: &EventAad<'_>) -> Result<Vec<u8>, CryptoError> {
        seal_with(&self.cipher, plaintext, &at.encode())
    }

    /// Opens an event's personal fields; any mismatch is [`CryptoError::Integrity`].
    pub fn open_event(
        &self,
        blob: &[u8],
        at: &EventAad<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        open_with(&self.cipher, blob, &at.encode())
    }

    /// Seals a snapshot's state under this key alone: the form snapshots
    /// were saved in before they were sealed for every subject of their
    /// stream ([`seal_snapshot_for`]); kept to make and read that form.
    pub fn seal_snapshot(
        &self,
        plaintext: &[u8],
        at: &SnapshotAad<'_>,
    ) -> Result<Vec<u8>, CryptoError> {
        seal_with(&self.cipher, plaintext, &at.encode())
    }

    /// Opens a snapshot's state; any mismatch is [`CryptoError::Integrity`].
    pub fn open_snapshot(
        &self,
        blob: &[u8],
        at: &SnapshotAad<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        open_with(&self.cipher, blob, &at.encode())
    }
}

/// A freshly generated data key together with its wrapped form, ready to be
/// stored. The raw bytes never leave this module.
pub struct NewDek {
    pub dek: Dek,
    pub wrapped: Vec<u8>,
}

/// The master key-encryption key. No `Debug`, no `Clone`; in this process
/// its cipher state is zeroized on drop, on a token it never leaves it.
pub struct Kek {
    cipher: Box<dyn Gcm>,
    id: String,
    /// Whether its operations are calls into a token (a device that may be
    /// slow or gone), which the key manager makes off the async threads.
    on_token: bool,
}

impl Kek {
    /// Generates a new random master key and returns it with its base64 form
    /// (for the operator to store); the base64 string is zeroized on drop.
    pub fn generate() -> Result<(Self, Zeroizing<String>), CryptoError> {
        use base64::Engine as _;
        let bytes = random_bytes::<KEY_LEN>()?;
        let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&bytes[..]));
        Ok((Self::from_bytes(&bytes[..])?, encoded))
    }

    /// A master key from its 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != KEY_LEN {
            return Err(CryptoError::MalformedKey);
        }
        // The id is a one-way digest of the key: it names the key in the
        // keystore without revealing anything about it.
        let mut input = Zeroizing::new(Vec::with_capacity(KEK_ID_LABEL.len() + KEY_LEN));
        input.extend_from_slice(KEK_ID_LABEL);
        input.extend_from_slice(bytes);
        let id = hex::encode(&digest::digest(&digest::SHA256, &input).as_ref()[..8]);
        Ok(Self {
            cipher: Box::new(cipher_from(bytes)?),
            id,
            on_token: false,
        })
    }

    /// A master key held by a token: `cipher` runs inside it; `token_id` is
    /// what the token stores to tell this key from every other (its
    /// `CKA_ID`), from which the public id is derived.
    pub(crate) fn on_token(cipher: Box<dyn Gcm>, token_id: &[u8]) -> Self {
        let mut input = Vec::with_capacity(KEK_ID_LABEL.len() + 8 + token_id.len());
        input.extend_from_slice(KEK_ID_LABEL);
        input.extend_from_slice(b"/pkcs11/");
        input.extend_from_slice(token_id);
        let id = hex::encode(&digest::digest(&digest::SHA256, &input).as_ref()[..8]);
        Self {
            cipher,
            id,
            on_token: true,
        }
    }

    /// Whether this key's operations are calls into a token.
    pub fn is_on_token(&self) -> bool {
        self.on_token
    }

    /// A master key from its base64 text (surrounding white space ignored).
    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        use base64::Engine as _;
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| CryptoError::MalformedKey)?,
        );
        Self::from_bytes(&bytes)
    }

    /// The public name of this key, recorded beside every key it wraps.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A constant sealed under this key, stored in the keystore so that a
    /// wrong master key is detected at start rather than when data is read.
    pub fn seal_check(&self) -> Result<Vec<u8>, CryptoError> {
        seal_with(
            self.cipher.as_ref(),
            KEK_CHECK_LABEL,
            &aad(KEK_CHECK_LABEL, &[self.id.as_bytes()]),
        )
    }

    /// Whether `blob` was made by [`Kek::seal_check`] with this very key.
    pub fn verify_check(&self, blob: &[u8]) -> Result<(), CryptoError> {
        let plain = open_with(
            self.cipher.as_ref(),
            blob,
            &aad(KEK_CHECK_LABEL, &[self.id.as_bytes()]),
        )?;
        if plain.as_slice() == KEK_CHECK_LABEL {
            Ok(())
        } else {
            Err(CryptoError::Integrity)
        }
    }

    /// Generates a data key for `subject` and wraps it under this master key.
    pub fn new_dek(&self, key_id: &str, subject: &str) -> Result<NewDek, CryptoError> {
        let raw = random_bytes::<KEY_LEN>()?;
        let wrapped = seal_with(
            self.cipher.as_ref(),
            &raw[..],
            &aad(DEK_AAD_LABEL, &[key_id.as_bytes(), subject.as_bytes()]),
        )?;
        Ok(NewDek {
            dek: Dek {
                cipher: cipher_from(&raw[..])?,
            },
            wrapped,
        })
    }

    /// Unwraps a stored data key; fails if it was wrapped under another
    /// master key or for another key id or subject.
    pub fn unwrap_dek(
        &self,
        wrapped: &[u8],
        key_id: &str,
        subject: &str,
    ) -> Result<Dek, CryptoError> {
        let raw = open_with(
            self.cipher.as_ref(),
            wrapped,
            &aad(DEK_AAD_LABEL, &[key_id.as_bytes(), subject.as_bytes()]),
        )?;
        if raw.len() != KEY_LEN {
            return Err(CryptoError::Integrity);
        }
        Ok(Dek {
            cipher: cipher_from(&raw)?,
        })
    }

    /// Re-wraps a data key wrapped under `old` so that this key opens it.
    pub fn rewrap_from(
        &self,
        old: &Kek,
        wrapped: &[u8],
        key_id: &str,
        subject: &str,
    ) -> Result<Vec<u8>, CryptoError> {
        let ad = aad(DEK_AAD_LABEL, &[key_id.as_bytes(), subject.as_bytes()]);
        let raw = open_with(old.cipher.as_ref(), wrapped, &ad)?;
        seal_with(self.cipher.as_ref(), &raw, &ad)
    }
}

/// Hex SHA-256 of a bearer token: what the principals table stores.
pub fn token_hash(token: &str) -> String {
    hex::encode(digest::digest(&digest::SHA256, token.as_bytes()))
}

/// A new bearer token: 256 random bits, base64url, with a recognisable prefix
/// so that secret scanners can find leaked ones.
pub fn new_token() -> Result<Zeroizing<String>, CryptoError> {
    use base64::Engine as _;
    let bytes = random_bytes::<32>()?;
    Ok(Zeroizing::new(format!(
        "evt_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes[..])
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek() -> Kek {
        Kek::generate().unwrap().0
    }

    fn at<'a>(id: &'a [u8; 16], stream: &'a str) -> EventAad<'a> {
        EventAad {
            event_id: id,
            stream_id: stream,
            event_type: "MoneyDeposited",
            key_id: "k1",
        }
    }

    #[test]
    fn event_round_trip_and_binding() {
        let kek = kek();
        let NewDek { dek, wrapped } = kek.new_dek("k1", "cust-1").unwrap();
        let id = [7u8; 16];
        let blob = dek
            .seal_event(b"{\"payer_name\":\"Jane\"}", &at(&id, "s1"))
            .unwrap();
        assert_eq!(blob[0], FORMAT_V1);
        assert_eq!(
            &dek.open_event(&blob, &at(&id, "s1")).unwrap()[..],
            b"{\"payer_name\":\"Jane\"}"
        );
        // Moved to another stream or event: refused.
        assert_eq!(
            dek.open_event(&blob, &at(&id, "s2")).err(),
            Some(CryptoError::Integrity)
        );
        assert_eq!(
            dek.open_event(&blob, &at(&[8u8; 16], "s1")).err(),
            Some(CryptoError::Integrity)
        );
        // The wrapped key opens only for its own id and subject, under its own KEK.
        assert!(kek.unwrap_dek(&wrapped, "k1", "cust-1").is_ok());
        assert!(kek.unwrap_dek(&wrapped, "k1", "cust-2").is_err());
        assert!(kek.unwrap_dek(&wrapped, "k2", "cust-1").is_err());
        assert!(self::kek().unwrap_dek(&wrapped, "k1", "cust-1").is_err());
    }

    #[test]
    fn altered_blobs_are_one_opaque_error() {
        let kek = kek();
        let dek = kek.new_dek("k1", "c").unwrap().dek;
        let id = [1u8; 16];
        let blob = dek.seal_event(b"secret", &at(&id, "s")).unwrap();
        let mut variants = vec![
            blob[..blob.len() - 1].to_vec(),
            [blob.clone(), vec![0]].concat(),
            vec![],
            vec![FORMAT_V1],
        ];
        for i in 0..blob.len() {
            let mut flipped = blob.clone();
            flipped[i] ^= 0x01;
            variants.push(flipped);
        }
        for v in variants {
            assert_eq!(
                dek.open_event(&v, &at(&id, "s")).err(),
                Some(CryptoError::Integrity)
            );
        }
    }

    #[test]
    fn nonces_are_fresh() {
        let dek = kek().new_dek("k", "c").unwrap().dek;
        let id = [0u8; 16];
        let a = dek.seal_event(b"same", &at(&id, "s")).unwrap();
        let b = dek.seal_event(b"same", &at(&id, "s")).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn kek_check_and_rewrap() {
        let (k1, b64) = Kek::generate().unwrap();
        let again = Kek::from_base64(&b64).unwrap();
        assert_eq!(k1.id(), again.id());
        let check = k1.seal_check().unwrap();
        assert!(again.verify_check(&check).is_ok());
        let k2 = kek();
        assert_ne!(k1.id(), k2.id());
        assert!(k2.verify_check(&check).is_err());
        let wrapped = k1.new_dek("k", "c").unwrap().wrapped;
        let rewrapped = k2.rewrap_from(&k1, &wrapped, "k", "c").unwrap();
        assert!(k2.unwrap_dek(&rewrapped, "k", "c").is_ok());
        assert!(k1.unwrap_dek(&rewrapped, "k", "c").is_err());
        assert!(Kek::from_base64("not base64!").is_err());
        assert!(Kek::from_bytes(&[0u8; 31]).is_err());
    }

    #[test]
    fn aad_fields_cannot_run_together() {
        assert_ne!(aad(b"l", &[b"ab", b"c"]), aad(b"l", &[b"a", b"bc"]));
    }

    #[test]
    fn tokens() {
        let t = new_token().unwrap();
        assert!(t.starts_with("evt_") && t.len() == 47);
        assert_eq!(token_hash(&t).len(), 64);
        assert_ne!(*new_token().unwrap(), *t);
    }
}

/// Property tests: sealing round-trips, and every altered blob, every other
/// place and every random byte string is the one opaque error.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// An alteration of a sealed blob.
    #[derive(Debug, Clone)]
    enum Damage {
        /// Keep only the first `n` bytes (`n` taken modulo the length).
        Truncate(usize),
        /// Append these bytes (at least one).
        Extend(Vec<u8>),
        /// Flip one bit: byte index (modulo the length) and bit.
        Flip(usize, u8),
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            any::<usize>().prop_map(Damage::Truncate),
            prop::collection::vec(any::<u8>(), 1..40).prop_map(Damage::Extend),
            (any::<usize>(), 0u8..8).prop_map(|(i, b)| Damage::Flip(i, b)),
        ]
    }

    fn apply(blob: &[u8], d: &Damage) -> Vec<u8> {
        match d {
            Damage::Truncate(n) => blob[..n % blob.len()].to_vec(),
            Damage::Extend(more) => [blob, more].concat(),
            Damage::Flip(i, bit) => {
                let mut out = blob.to_vec();
                out[i % blob.len()] ^= 1 << bit;
                out
            }
        }
    }

    /// The fields of an event's associated data.
    #[derive(Debug, Clone, PartialEq)]
    struct Place {
        id: [u8; 16],
        stream: String,
        event_type: String,
        key_id: String,
    }

    impl Place {
        fn aad(&self) -> EventAad<'_> {
            EventAad {
                event_id: &self.id,
                stream_id: &self.stream,
                event_type: &self.event_type,
                key_id: &self.key_id,
            }
        }
    }

    fn place() -> impl Strategy<Value = Place> {
        (any::<[u8; 16]>(), ".{0,12}", ".{0,12}", ".{0,12}").prop_map(
            |(id, stream, event_type, key_id)| Place {
                id,
                stream,
                event_type,
                key_id,
            },
        )
    }

    /// `p` with exactly one field changed (to a value different from before).
    fn moved(p: &Place, field: u8, other: &str, flip: usize) -> Place {
        let mut q = p.clone();
        let change = |s: &mut String| {
            if s == other {
                s.push('x');
            } else {
                *s = other.to_owned();
            }
        };
        match field % 4 {
            0 => q.id[flip % 16] ^= 1,
            1 => change(&mut q.stream),
            2 => change(&mut q.event_type),
            _ => change(&mut q.key_id),
        }
        q
    }

    fn dek() -> Dek {
        Kek::generate().unwrap().0.new_dek("k", "s").unwrap().dek
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn events_round_trip(plain in prop::collection::vec(any::<u8>(), 0..512), at in place()) {
            let dek = dek();
            let blob = dek.seal_event(&plain, &at.aad()).unwrap();
            prop_assert_eq!(blob.len(), 1 + NONCE_LEN + plain.len() + TAG_LEN);
            prop_assert_eq!(&dek.open_event(&blob, &at.aad()).unwrap()[..], &plain[..]);
        }

        #[test]
        fn damaged_event_blobs_are_integrity_errors(
            plain in prop::collection::vec(any::<u8>(), 0..128),
            at in place(),
            d in damage(),
        ) {
            let dek = dek();
            let blob = dek.seal_event(&plain, &at.aad()).unwrap();
            let bad = apply(&blob, &d);
            prop_assert_eq!(dek.open_event(&bad, &at.aad()).err(), Some(CryptoError::Integrity));
        }

        #[test]
        fn event_blobs_open_only_in_their_place(
            plain in prop::collection::vec(any::<u8>(), 0..64),
            at in place(),
            field in any::<u8>(),
            other in ".{0,12}",
            flip in any::<usize>(),
        ) {
            let dek = dek();
            let blob = dek.seal_event(&plain, &at.aad()).unwrap();
            let elsewhere = moved(&at, field, &other, flip);
            prop_assert_ne!(&elsewhere, &at);
            prop_assert_eq!(dek.open_event(&blob, &elsewhere.aad()).err(), Some(CryptoError::Integrity));
            // Nor under another key, nor as a snapshot.
            prop_assert_eq!(self::dek().open_event(&blob, &at.aad()).err(), Some(CryptoError::Integrity));
            let as_snapshot = SnapshotAad { stream_id: &at.stream, version: 1, key_id: &at.key_id };
            prop_assert_eq!(dek.open_snapshot(&blob, &as_snapshot).err(), Some(CryptoError::Integrity));
        }

        #[test]
        fn random_bytes_are_integrity_errors(
            blob in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..80),
                // Well-formed header, random rest.
                prop::collection::vec(any::<u8>(), 0..80).prop_map(|b| [&[FORMAT_V1][..], &b].concat()),
            ],
            at in place(),
            version in any::<u64>(),
        ) {
            let dek = dek();
            prop_assert_eq!(dek.open_event(&blob, &at.aad()).err(), Some(CryptoError::Integrity));
            let snap = SnapshotAad { stream_id: &at.stream, version, key_id: &at.key_id };
            prop_assert_eq!(dek.open_snapshot(&blob, &snap).err(), Some(CryptoError::Integrity));
            let kek = Kek::generate().unwrap().0;
            prop_assert_eq!(kek.unwrap_dek(&blob, &at.key_id, &at.stream).err(), Some(CryptoError::Integrity));
            prop_assert_eq!(kek.verify_check(&blob).err(), Some(CryptoError::Integrity));
        }

        #[test]
        fn snapshots_round_trip_and_are_bound(
            plain in prop::collection::vec(any::<u8>(), 0..512),
            stream in ".{0,12}",
            version in any::<u64>(),
            key_id in ".{0,12}",
            d in damage(),
            other_version in any::<u64>(),
        ) {
            let dek = dek();
            let at = SnapshotAad { stream_id: &stream, version, key_id: &key_id };
            let blob = dek.seal_snapshot(&plain, &at).unwrap();
            prop_assert_eq!(&dek.open_snapshot(&blob, &at).unwrap()[..], &plain[..]);
            prop_assert_eq!(dek.open_snapshot(&apply(&blob, &d), &at).err(), Some(CryptoError::Integrity));
            if other_version != version {
                let later = SnapshotAad { version: other_version, ..at };
                prop_assert_eq!(dek.open_snapshot(&blob, &later).err(), Some(CryptoError::Integrity));
            }
            let other_stream = format!("{stream}x");
            let moved = SnapshotAad { stream_id: &other_stream, version, key_id: &key_id };
            prop_assert_eq!(dek.open_snapshot(&blob, &moved).err(), Some(CryptoError::Integrity));
        }

        /// A snapshot sealed for several subjects opens with all their keys
        /// in order, and with nothing less: a key missing (forgotten), replaced,
        /// the layers reordered or cut, another stream, version or key-id
        /// list, or any damage, is the one opaque error.
        #[test]
        fn snapshots_for_several_subjects_need_every_key(
            plain in prop::collection::vec(any::<u8>(), 0..256),
            n in 1usize..5,
            stream in ".{0,12}",
            version in any::<u64>(),
            gone in any::<usize>(),
            d in damage(),
        ) {
            let keys: Vec<Dek> = (0..n).map(|_| dek()).collect();
            let ids: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
            let key_ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let all: Vec<&Dek> = keys.iter().collect();
            let at = SnapshotLayers { stream_id: &stream, version, key_ids: &key_ids };
            let s = seal_snapshot_for(&all, &at, &plain).unwrap();
            prop_assert_eq!(s.wrapped_key.len(), KEY_LEN + n * (1 + NONCE_LEN + TAG_LEN));
            prop_assert_eq!(&open_snapshot_for(&all, &at, &s.wrapped_key, &s.sealed).unwrap()[..], &plain[..]);
            let refused = |deks: &[&Dek], at: &SnapshotLayers<'_>, wrapped: &[u8], sealed: &[u8]| {
                open_snapshot_for(deks, at, wrapped, sealed).err() == Some(CryptoError::Integrity)
            };
            // One key destroyed (another in its place): the others do not open it.
            let other = dek();
            let mut one_gone = all.clone();
            one_gone[gone % n] = &other;
            prop_assert!(refused(&one_gone, &at, &s.wrapped_key, &s.sealed));
            if n > 1 {
                let mut reordered = all.clone();
                reordered.swap(0, n - 1);
                prop_assert!(refused(&reordered, &at, &s.wrapped_key, &s.sealed));
                let fewer = SnapshotLayers { key_ids: &key_ids[..n - 1], ..at };
                prop_assert!(refused(&all[..n - 1], &fewer, &s.wrapped_key, &s.sealed));
            }
            let other_version = SnapshotLayers { version: version.wrapping_add(1), ..at };
            prop_assert!(refused(&all, &other_version, &s.wrapped_key, &s.sealed));
            let other_stream = format!("{stream}x");
            let moved = SnapshotLayers { stream_id: &other_stream, ..at };
            prop_assert!(refused(&all, &moved, &s.wrapped_key, &s.sealed));
            let mut renamed = key_ids.clone();
            renamed[gone % n] = "elsewhere";
            let renamed = SnapshotLayers { key_ids: &renamed, ..at };
            prop_assert!(refused(&all, &renamed, &s.wrapped_key, &s.sealed));
            prop_assert!(refused(&all, &at, &apply(&s.wrapped_key, &d), &s.sealed));
            prop_assert!(refused(&all, &at, &s.wrapped_key, &apply(&s.sealed, &d)));
            // Nor is it a snapshot of the older form, under any one key.
            let old = SnapshotAad { stream_id: &stream, version, key_id: key_ids[0] };
            prop_assert_eq!(keys[0].open_snapshot(&s.sealed, &old).err(), Some(CryptoError::Integrity));
            let no_layer = SnapshotLayers { key_ids: &[], ..at };
            let sealed_for_nobody = seal_snapshot_for(&[], &no_layer, &plain);
            prop_assert!(sealed_for_nobody.is_err());
        }

        #[test]
        fn wrapped_keys_unwrap_only_intact_and_in_place(
            key_id in ".{0,12}",
            subject in ".{0,12}",
            d in damage(),
            other in ".{1,12}",
        ) {
            let kek = Kek::generate().unwrap().0;
            let NewDek { dek, wrapped } = kek.new_dek(&key_id, &subject).unwrap();
            let id = [3u8; 16];
            let at = EventAad { event_id: &id, stream_id: "s", event_type: "t", key_id: &key_id };
            let blob = dek.seal_event(b"x", &at).unwrap();
            let again = kek.unwrap_dek(&wrapped, &key_id, &subject).unwrap();
            prop_assert_eq!(&again.open_event(&blob, &at).unwrap()[..], b"x");
            prop_assert_eq!(kek.unwrap_dek(&apply(&wrapped, &d), &key_id, &subject).err(), Some(CryptoError::Integrity));
            let other_key = format!("{key_id}{other}");
            let other_subject = format!("{subject}{other}");
            prop_assert_eq!(kek.unwrap_dek(&wrapped, &other_key, &subject).err(), Some(CryptoError::Integrity));
            prop_assert_eq!(kek.unwrap_dek(&wrapped, &key_id, &other_subject).err(), Some(CryptoError::Integrity));
            // The fields are length-prefixed: moving a character from one to
            // the other is another place too.
            if let Some(c) = subject.chars().next() {
                let shifted_key = format!("{key_id}{c}");
                prop_assert_eq!(
                    kek.unwrap_dek(&wrapped, &shifted_key, &subject[c.len_utf8()..]).err(),
                    Some(CryptoError::Integrity)
                );
            }
        }

        #[test]
        fn master_keys_from_base64(
            bytes in prop::collection::vec(any::<u8>(), 0..48),
            pad in "[ \t\r\n]{0,3}",
        ) {
            use base64::Engine as _;
            let text = format!("{pad}{}{pad}", base64::engine::general_purpose::STANDARD.encode(&bytes));
            match Kek::from_base64(&text) {
                Ok(kek) => {
                    prop_assert_eq!(bytes.len(), KEY_LEN);
                    let same = Kek::from_bytes(&bytes).unwrap();
                    prop_assert_eq!(kek.id(), same.id());
                }
                Err(e) => {
                    prop_assert_ne!(bytes.len(), KEY_LEN);
                    prop_assert_eq!(e, CryptoError::MalformedKey);
                }
            }
        }

        #[test]
        fn master_key_text_never_panics(text in prop_oneof![any::<String>(), "[A-Za-z0-9+/=]{40,48}"]) {
            match Kek::from_base64(&text) {
                Ok(kek) => prop_assert_eq!(kek.id().len(), 16),
                Err(e) => prop_assert_eq!(e, CryptoError::MalformedKey),
            }
        }
    }
}

/// Known-answer tests: blobs sealed once by this module and kept in
/// `tests/vectors/` must still open to their plaintext, and every altered
/// copy (a byte flipped, the blob cut short, any associated-data field
/// changed, a blob of another vector in its place) must be the one opaque
/// error. A change to the associated data or to the blob layout fails here
/// rather than leaving stored data unreadable.
#[cfg(test)]
mod vectors {
    use super::*;
    use serde_json::Value;

    const WRAPPED_KEY: &str = include_str!("../tests/vectors/wrapped_key.json");
    const EVENT: &str = include_str!("../tests/vectors/event.json");
    const SNAPSHOT_SINGLE_KEY: &str = include_str!("../tests/vectors/snapshot_single_key.json");
    const SNAPSHOT_LAYERED: &str = include_str!("../tests/vectors/snapshot_layered.json");

    fn json(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    fn bytes(v: &Value) -> Vec<u8> {
        hex::decode(v.as_str().unwrap()).unwrap()
    }

    fn text(v: &Value) -> &str {
        v.as_str().unwrap()
    }

    fn kek() -> Kek {
        let v = json(WRAPPED_KEY);
        let kek = Kek::from_bytes(&bytes(&v["master_key"])).unwrap();
        assert_eq!(kek.id(), text(&v["master_key_id"]), "the master key's id");
        kek
    }

    /// The data key `i` of `wrapped_key.json`, unwrapped.
    fn dek(i: usize) -> Dek {
        let v = json(WRAPPED_KEY);
        let k = &v["keys"][i];
        kek()
            .unwrap_dek(
                &bytes(&k["wrapped"]),
                text(&k["key_id"]),
                text(&k["subject"]),
            )
            .unwrap()
    }

    /// Every copy of `blob` with one byte flipped, and every prefix of it.
    fn damaged(blob: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for i in 0..blob.len() {
            let mut b = blob.to_vec();
            b[i] ^= 0x01;
            out.push(b);
        }
        out.extend((0..blob.len()).map(|n| blob[..n].to_vec()));
        out
    }

    /// A string other than `s` (one character changed, same length) and
    /// others of other lengths.
    fn others(s: &str) -> Vec<String> {
        let mut changed: Vec<char> = s.chars().collect();
        changed[0] = if changed[0] == 'x' { 'y' } else { 'x' };
        vec![
            changed.into_iter().collect(),
            format!("{s}x"),
            s[..s.len() - 1].to_owned(),
            String::new(),
        ]
    }

    /// `version byte 1 | 96-bit nonce | ciphertext | 128-bit tag`.
    fn assert_layout(blob: &[u8], plaintext_len: usize) {
        assert_eq!(blob[0], FORMAT_V1, "the format byte");
        assert_eq!(blob.len(), 1 + NONCE_LEN + plaintext_len + TAG_LEN);
    }

    const INTEGRITY: Option<CryptoError> = Some(CryptoError::Integrity);

    #[test]
    fn the_wrapped_data_keys_open_and_altered_copies_fail() {
        let v = json(WRAPPED_KEY);
        let kek = kek();
        let keys = v["keys"].as_array().unwrap();
        for (i, k) in keys.iter().enumerate() {
            let (wrapped, key_id, subject) = (
                bytes(&k["wrapped"]),
                text(&k["key_id"]),
                text(&k["subject"]),
            );
            assert_layout(&wrapped, KEY_LEN);
            assert!(kek.unwrap_dek(&wrapped, key_id, subject).is_ok());
            for bad in damaged(&wrapped) {
                assert_eq!(kek.unwrap_dek(&bad, key_id, subject).err(), INTEGRITY);
            }
            for other in others(key_id) {
                assert_eq!(kek.unwrap_dek(&wrapped, &other, subject).err(), INTEGRITY);
            }
            for other in others(subject) {
                assert_eq!(kek.unwrap_dek(&wrapped, key_id, &other).err(), INTEGRITY);
            }
            // Key id and subject swapped: the fields are not interchangeable.
            assert_eq!(kek.unwrap_dek(&wrapped, subject, key_id).err(), INTEGRITY);
            // The other key's blob in this key's place.
            let other = bytes(&keys[1 - i]["wrapped"]);
            assert_eq!(kek.unwrap_dek(&other, key_id, subject).err(), INTEGRITY);
            // Under another master key.
            let mut master = bytes(&v["master_key"]);
            master[0] ^= 0x01;
            let wrong = Kek::from_bytes(&master).unwrap();
            assert_eq!(wrong.unwrap_dek(&wrapped, key_id, subject).err(), INTEGRITY);
        }
        // Blobs of the other vectors in a wrapped key's place.
        let (k0, ev) = (&keys[0], json(EVENT));
        let (key_id, subject) = (text(&k0["key_id"]), text(&k0["subject"]));
        for blob in [
            bytes(&ev["blob"]),
            bytes(&json(SNAPSHOT_SINGLE_KEY)["blob"]),
            bytes(&json(SNAPSHOT_LAYERED)["wrapped_key"]),
        ] {
            assert_eq!(kek.unwrap_dek(&blob, key_id, subject).err(), INTEGRITY);
        }
    }

    #[test]
    fn the_sealed_event_opens_and_altered_copies_fail() {
        let v = json(EVENT);
        let dek = dek(v["key"].as_u64().unwrap() as usize);
        let blob = bytes(&v["blob"]);
        let event_id: [u8; 16] = bytes(&v["event_id"]).try_into().unwrap();
        let (stream_id, event_type, key_id) = (
            text(&v["stream_id"]),
            text(&v["event_type"]),
            text(&v["key_id"]),
        );
        let at = EventAad {
            event_id: &event_id,
            stream_id,
            event_type,
            key_id,
        };
        let plaintext = text(&v["plaintext"]).as_bytes();
        assert_layout(&blob, plaintext.len());
        assert_eq!(&dek.open_event(&blob, &at).unwrap()[..], plaintext);

        for bad in damaged(&blob) {
            assert_eq!(dek.open_event(&bad, &at).err(), INTEGRITY);
        }
        for i in 0..16 {
            let mut other = event_id;
            other[i] ^= 0x01;
            let moved = EventAad {
                event_id: &other,
                ..at
            };
            assert_eq!(dek.open_event(&blob, &moved).err(), INTEGRITY);
        }
        for other in others(stream_id) {
            let moved = EventAad {
                stream_id: &other,
                ..at
            };
            assert_eq!(dek.open_event(&blob, &moved).err(), INTEGRITY);
        }
        for other in others(event_type) {
            let moved = EventAad {
                event_type: &other,
                ..at
            };
            assert_eq!(dek.open_event(&blob, &moved).err(), INTEGRITY);
        }
        for other in others(key_id) {
            let moved = EventAad {
                key_id: &other,
                ..at
            };
            assert_eq!(dek.open_event(&blob, &moved).err(), INTEGRITY);
        }
        // Stream id and event type swapped.
        let swapped = EventAad {
            stream_id: event_type,
            event_type: stream_id,
            ..at
        };
        assert_eq!(dek.open_event(&blob, &swapped).err(), INTEGRITY);
        // Under the other subject's key.
        assert_eq!(self::dek(1).open_event(&blob, &at).err(), INTEGRITY);
        // Blobs of the other vectors in the event's place.
        let layered = json(SNAPSHOT_LAYERED);
        for other in [
            bytes(&json(SNAPSHOT_SINGLE_KEY)["blob"]),
            bytes(&layered["wrapped_key"]),
            bytes(&layered["sealed"]),
            bytes(&json(WRAPPED_KEY)["keys"][0]["wrapped"]),
        ] {
            assert_eq!(dek.open_event(&other, &at).err(), INTEGRITY);
        }
    }

    #[test]
    fn the_single_key_snapshot_opens_and_altered_copies_fail() {
        let v = json(SNAPSHOT_SINGLE_KEY);
        let dek = dek(v["key"].as_u64().unwrap() as usize);
        let blob = bytes(&v["blob"]);
        let (stream_id, version, key_id) = (
            text(&v["stream_id"]),
            v["version"].as_u64().unwrap(),
            text(&v["key_id"]),
        );
        let at = SnapshotAad {
            stream_id,
            version,
            key_id,
        };
        let plaintext = text(&v["plaintext"]).as_bytes();
        assert_layout(&blob, plaintext.len());
        assert_eq!(&dek.open_snapshot(&blob, &at).unwrap()[..], plaintext);

        for bad in damaged(&blob) {
            assert_eq!(dek.open_snapshot(&bad, &at).err(), INTEGRITY);
        }
        for other in others(stream_id) {
            let moved = SnapshotAad {
                stream_id: &other,
                ..at
            };
            assert_eq!(dek.open_snapshot(&blob, &moved).err(), INTEGRITY);
        }
        for other in [0, version - 1, version + 1, version << 32, u64::MAX] {
            let moved = SnapshotAad {
                version: other,
                ..at
            };
            assert_eq!(dek.open_snapshot(&blob, &moved).err(), INTEGRITY);
        }
        for other in others(key_id) {
            let moved = SnapshotAad {
                key_id: &other,
                ..at
            };
            assert_eq!(dek.open_snapshot(&blob, &moved).err(), INTEGRITY);
        }
        assert_eq!(self::dek(1).open_snapshot(&blob, &at).err(), INTEGRITY);
        // Blobs of the other vectors in the snapshot's place.
        let layered = json(SNAPSHOT_LAYERED);
        for other in [
            bytes(&json(EVENT)["blob"]),
            bytes(&layered["wrapped_key"]),
            bytes(&layered["sealed"]),
            bytes(&json(WRAPPED_KEY)["keys"][0]["wrapped"]),
        ] {
            assert_eq!(dek.open_snapshot(&other, &at).err(), INTEGRITY);
        }
    }

    #[test]
    fn the_layered_snapshot_opens_and_altered_copies_fail() {
        let v = json(SNAPSHOT_LAYERED);
        let indices: Vec<usize> = v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as usize)
            .collect();
        let owned: Vec<Dek> = indices.iter().map(|&i| dek(i)).collect();
        let deks: Vec<&Dek> = owned.iter().collect();
        let key_ids: Vec<&str> = v["key_ids"].as_array().unwrap().iter().map(text).collect();
        let (stream_id, version) = (text(&v["stream_id"]), v["version"].as_u64().unwrap());
        let (wrapped, sealed) = (bytes(&v["wrapped_key"]), bytes(&v["sealed"]));
        let at = SnapshotLayers {
            stream_id,
            version,
            key_ids: &key_ids,
        };
        let plaintext = text(&v["plaintext"]).as_bytes();
        assert_eq!(deks.len(), 2, "the vector has two layers");
        assert_layout(&sealed, plaintext.len());
        // Each layer wraps the one inside: the innermost is the 32-byte key.
        assert_eq!(wrapped[0], FORMAT_V1);
        assert_eq!(wrapped.len(), KEY_LEN + 2 * (1 + NONCE_LEN + TAG_LEN));
        assert_eq!(
            &open_snapshot_for(&deks, &at, &wrapped, &sealed).unwrap()[..],
            plaintext
        );

        let refused = |deks: &[&Dek], at: &SnapshotLayers<'_>, wrapped: &[u8], sealed: &[u8]| {
            assert_eq!(
                open_snapshot_for(deks, at, wrapped, sealed).err(),
                INTEGRITY
            );
        };
        for bad in damaged(&wrapped) {
            refused(&deks, &at, &bad, &sealed);
        }
        for bad in damaged(&sealed) {
            refused(&deks, &at, &wrapped, &bad);
        }
        for other in others(stream_id) {
            let moved = SnapshotLayers {
                stream_id: &other,
                ..at
            };
            refused(&deks, &moved, &wrapped, &sealed);
        }
        for other in [0, version - 1, version + 1, version << 32, u64::MAX] {
            let moved = SnapshotLayers {
                version: other,
                ..at
            };
            refused(&deks, &moved, &wrapped, &sealed);
        }
        // Each layer's key id changed.
        for i in 0..key_ids.len() {
            for other in others(key_ids[i]) {
                let mut ids = key_ids.clone();
                ids[i] = &other;
                let moved = SnapshotLayers {
                    key_ids: &ids,
                    ..at
                };
                refused(&deks, &moved, &wrapped, &sealed);
            }
        }
        // The layers' key ids in the other order, with or without their
        // keys; the keys in the other order.
        let ids: Vec<&str> = key_ids.iter().rev().copied().collect();
        let reordered = SnapshotLayers {
            key_ids: &ids,
            ..at
        };
        let rev: Vec<&Dek> = deks.iter().rev().copied().collect();
        refused(&deks, &reordered, &wrapped, &sealed);
        refused(&rev, &reordered, &wrapped, &sealed);
        refused(&rev, &at, &wrapped, &sealed);
        // A layer removed, or one added.
        for i in 0..2 {
            let one = SnapshotLayers {
                key_ids: &key_ids[i..=i],
                ..at
            };
            refused(&deks[i..=i], &one, &wrapped, &sealed);
        }
        let three_ids = [key_ids[0], key_ids[1], key_ids[1]];
        let three = SnapshotLayers {
            key_ids: &three_ids,
            ..at
        };
        refused(&[deks[0], deks[1], deks[1]], &three, &wrapped, &sealed);
        // One key's place taken by the other.
        refused(&[deks[0], deks[0]], &at, &wrapped, &sealed);
        refused(&[deks[1], deks[1]], &at, &wrapped, &sealed);
        // Blobs of the other vectors in either place.
        for other in [
            bytes(&json(EVENT)["blob"]),
            bytes(&json(SNAPSHOT_SINGLE_KEY)["blob"]),
            bytes(&json(WRAPPED_KEY)["keys"][0]["wrapped"]),
        ] {
            refused(&deks, &at, &other, &sealed);
            refused(&deks, &at, &wrapped, &other);
        }
        // The wrapped key and the state swapped.
        refused(&deks, &at, &sealed, &wrapped);
    }
}
