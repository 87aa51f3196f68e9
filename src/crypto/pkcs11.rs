//! The master key on a hardware token, through PKCS#11 (the `cryptoki`
//! binding): the key is an AES-256 secret key object that is sensitive and
//! not extractable, so its bytes never enter this process; every data key
//! is wrapped and unwrapped by AES-GCM calls into the token, with the same
//! associated data and the same blob format as a master key held here.
//!
//! A PKCS#11 module is initialised once per process (`C_Initialize` is
//! process-wide, and a second one fails), so contexts are kept in one
//! registry by module path and never finalised while the process runs.
//! Sessions are pooled: a call takes one, or opens one, and gives it back
//! unless the token said the session is no longer good.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::{CryptoError, Gcm, KEY_LEN, Kek, NONCE_LEN, TAG_LEN};

/// Why a master key on a token cannot be used. Each names the problem and
/// never the PIN.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot load the PKCS#11 module {module}: {reason}")]
    Module { module: PathBuf, reason: String },
    #[error(
        "no token labelled {0:?} is present (see `softhsm2-util --show-slots` or the HSM's tools)"
    )]
    NoToken(String),
    #[error("the user PIN of token {0:?} is wrong")]
    WrongPin(String),
    #[error("the user PIN of token {0:?} is locked")]
    PinLocked(String),
    #[error("no key labelled {object:?} is on token {token:?}")]
    NoKey { token: String, object: String },
    #[error(
        "token {token:?} holds {count} secret keys labelled {object:?}; remove all but the one in use"
    )]
    AmbiguousKey {
        token: String,
        object: String,
        count: usize,
    },
    #[error("key {object:?} on token {token:?} is not usable as the master key: {why}")]
    Unsuitable {
        token: String,
        object: String,
        why: &'static str,
    },
    #[error("token {token:?}: {call} failed: {reason}")]
    Call {
        token: String,
        call: &'static str,
        reason: String,
    },
}

/// What names a master key on a token: the token's and the key's labels
/// (an RFC 7512 URI's `token` and `object`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenKeyName {
    pub token: String,
    pub object: String,
}

/// One context per module path, for the life of the process.
fn context(module: &Path) -> Result<Pkcs11, TokenError> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let fail = |reason: String| TokenError::Module {
        module: module.to_owned(),
        reason,
    };
    let mut contexts = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .expect("pkcs11 contexts lock");
    if let Some(ctx) = contexts.get(module) {
        return Ok(ctx.clone());
    }
    if !module.exists() {
        return Err(fail("no such file".into()));
    }
    let ctx = Pkcs11::new(module).map_err(|e| fail(e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    contexts.insert(module.to_owned(), ctx.clone());
    Ok(ctx)
}

/// The master key `name` on the token of `module`, logged in with `pin`;
/// created on the token first (AES-256, sensitive, not extractable, with a
/// random `CKA_ID`) when `create` and the token has no key of that label.
/// Returns the key and whether it was just created.
pub fn open(
    module: &Path,
    name: &TokenKeyName,
    pin: &Zeroizing<String>,
    create: bool,
) -> Result<(Kek, bool), TokenError> {
    let ctx = context(module)?;
    let token = name.token.clone();
    let call = |call: &'static str| {
        let token = token.clone();
        move |e: Error| TokenError::Call {
            token,
            call,
            reason: e.to_string(),
        }
    };
    let slot = ctx
        .get_slots_with_token()
        .map_err(call("C_GetSlotList"))?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == name.token)
        })
        .ok_or_else(|| TokenError::NoToken(name.token.clone()))?;
    let session = ctx.open_rw_session(slot).map_err(call("C_OpenSession"))?;
    let pin_value = AuthPin::from(pin.as_str());
    match session.login(UserType::User, Some(&pin_value)) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(Error::Pkcs11(
            RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
            _,
        )) => {
            return Err(TokenError::WrongPin(name.token.clone()));
        }
        Err(Error::Pkcs11(RvError::PinLocked, _)) => {
            return Err(TokenError::PinLocked(name.token.clone()));
        }
        Err(e) => return Err(call("C_Login")(e)),
    }
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(name.object.as_bytes().to_vec()),
        ])
        .map_err(call("C_FindObjects"))?;
    let (key, created) = match found.as_slice() {
        [key] => (*key, false),
        [] if create => (
            generate(&session, name).map_err(call("C_GenerateKey"))?,
            true,
        ),
        [] => {
            return Err(TokenError::NoKey {
                token: name.token.clone(),
                object: name.object.clone(),
            });
        }
        more => {
            return Err(TokenError::AmbiguousKey {
                token: name.token.clone(),
                object: name.object.clone(),
                count: more.len(),
            });
        }
    };
    let token_id = check_suitable(&session, key, name).map_err(|e| match e {
        Checked::Unsuitable(why) => TokenError::Unsuitable {
            token: name.token.clone(),
            object: name.object.clone(),
            why,
        },
        Checked::Call(e) => call("C_GetAttributeValue")(e),
    })?;
    let key = TokenKey {
        ctx,
        slot,
        key,
        // The session that logged in stays open in the pool: a token logs
        // the application out when its last session closes.
        sessions: Mutex::new(vec![session]),
    };
    Ok((Kek::on_token(Box::new(key), &token_id), created))
}

fn generate(session: &Session, name: &TokenKeyName) -> Result<ObjectHandle, Error> {
    let mut id = [0u8; 16];
    session.generate_random_slice(&mut id)?;
    session.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::ValueLen((KEY_LEN as u64).into()),
            Attribute::Label(name.object.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ],
    )
}

enum Checked {
    Unsuitable(&'static str),
    Call(Error),
}

/// The key's `CKA_ID`, once it is proven an AES-256 key that is sensitive,
/// never extractable, and can encrypt and decrypt.
fn check_suitable(
    session: &Session,
    key: ObjectHandle,
    name: &TokenKeyName,
) -> Result<Vec<u8>, Checked> {
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Id,
            ],
        )
        .map_err(Checked::Call)?;
    let mut id = Vec::new();
    let (mut aes, mut len, mut sensitive, mut extractable, mut enc, mut dec) =
        (false, 0u64, false, true, false, false);
    for a in attrs {
        match a {
            Attribute::KeyType(t) => aes = t == KeyType::AES,
            Attribute::ValueLen(n) => len = n.into(),
            Attribute::Sensitive(b) => sensitive = b,
            Attribute::Extractable(b) => extractable = b,
            Attribute::Encrypt(b) => enc = b,
            Attribute::Decrypt(b) => dec = b,
            Attribute::Id(v) => id = v,
            _ => {}
        }
    }
    let why = if !aes || len != KEY_LEN as u64 {
        Some("it is not an AES-256 key")
    } else if !sensitive || extractable {
        Some("it is extractable or not sensitive, so its bytes could leave the token")
    } else if !(enc && dec) {
        Some("it may not encrypt and decrypt")
    } else {
        None
    };
    if let Some(why) = why {
        return Err(Checked::Unsuitable(why));
    }
    // A key made by other tools may have no CKA_ID: its label names it.
    if id.is_empty() {
        id = name.object.as_bytes().to_vec();
    }
    Ok(id)
}

/// AES-GCM inside the token, under the master key object.
struct TokenKey {
    ctx: Pkcs11,
    slot: Slot,
    key: ObjectHandle,
    /// Sessions not in use. A `Session` is used by one thread at a time.
    sessions: Mutex<Vec<Session>>,
}

/// Whether an error says the session itself is no longer good (closed by
/// the token, the device removed or reset), so it is not pooled again.
fn session_is_lost(e: &Error) -> bool {
    matches!(
        e,
        Error::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

/// What the token's AES-GCM is tried on when a decryption fails in a way
/// that does not say why: many tokens (SoftHSM2 among them) answer a tag
/// that does not match with a general error, as they answer a failing
/// device.
const PROBE: &[u8] = b"eventvault/token-probe/v1";

impl TokenKey {
    /// Runs `op` on a pooled session (or a new one), which goes back to the
    /// pool unless the token said it is no longer good.
    fn with_session<T>(&self, op: impl FnOnce(&Session) -> Result<T, Error>) -> Result<T, Error> {
        let pooled = self.sessions.lock().expect("sessions lock").pop();
        let session = match pooled {
            Some(s) => s,
            None => self.ctx.open_ro_session(self.slot)?,
        };
        let result = op(&session);
        if !matches!(&result, Err(e) if session_is_lost(e)) {
            self.sessions.lock().expect("sessions lock").push(session);
        }
        result
    }

    fn gcm(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], op: GcmOp<'_>) -> Result<Vec<u8>, Error> {
        self.with_session(|s| {
            let mut iv = *nonce;
            let params = GcmParams::new(&mut iv, aad, ((TAG_LEN * 8) as u64).into())?;
            let mechanism = Mechanism::AesGcm(params);
            match op {
                GcmOp::Encrypt(plain) => s.encrypt(&mechanism, self.key, plain),
                GcmOp::Decrypt(ct) => s.decrypt(&mechanism, self.key, ct),
            }
        })
    }

    /// Whether the token's AES-GCM works: it opens what it has just sealed.
    fn works(&self) -> bool {
        // A fresh nonce, as for every sealing: never one used before.
        let Ok(nonce) = super::random_bytes::<NONCE_LEN>() else {
            return false;
        };
        let nonce: [u8; NONCE_LEN] = *nonce;
        self.gcm(&nonce, PROBE, GcmOp::Encrypt(PROBE))
            .and_then(|ct| self.gcm(&nonce, PROBE, GcmOp::Decrypt(&ct)))
            .is_ok_and(|plain| plain == PROBE)
    }
}

enum GcmOp<'a> {
    Encrypt(&'a [u8]),
    Decrypt(&'a [u8]),
}

/// Logs a failed call (never any data) and says it is an outage.
fn unavailable(e: &Error) -> CryptoError {
    tracing::warn!(error = %e, "the master key's token refused an operation");
    CryptoError::Unavailable
}

impl Gcm for TokenKey {
    fn encrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.gcm(nonce, aad, GcmOp::Encrypt(plaintext))
            .map_err(|e| unavailable(&e))
    }

    /// A blob that does not open is [`CryptoError::Integrity`], a token
    /// that does not work [`CryptoError::Unavailable`]: when the token's
    /// error does not tell them apart, a probe of its AES-GCM does.
    fn decrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        match self.gcm(nonce, aad, GcmOp::Decrypt(ciphertext)) {
            Ok(plain) => Ok(Zeroizing::new(plain)),
            Err(Error::Pkcs11(
                RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
                _,
            )) => Err(CryptoError::Integrity),
            Err(e) if !session_is_lost(&e) && self.works() => Err(CryptoError::Integrity),
            Err(e) => Err(unavailable(&e)),
        }
    }
}
