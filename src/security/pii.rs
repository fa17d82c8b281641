//! Encryption at rest of sensitive property values (PII_FIELDS) with AES-256-GCM.
//!
//! A sensitive value is replaced, before it reaches PostgreSQL, by the JSON string
//! `enc:v1:<key_id>:<base64(nonce || ciphertext)>`: a random 96-bit nonce per value, the
//! key id next to the ciphertext so any configured key decrypts it, and the property key
//! as associated data (a ciphertext moved to another property does not decrypt). The
//! plaintext is the value's JSON text, so numbers and booleans keep their type.
//!
//! Keys come from PII_KEYS_FILE (a mounted Secret): one `KEY_ID:BASE64_32_BYTE_KEY` per line,
//! the first line encrypting new writes, every line decrypting. Rotation: put the new
//! key first, keep the old ones, then run `analytics-service reencrypt`.
//!
//! A property is sensitive when its key, trimmed of surrounding white space and compared
//! ignoring ASCII case, is one of PII_FIELDS (`Email`, ` email ` and `EMAIL` all match
//! `email`). Every sensitive value written is encrypted, whatever it looks like: a value
//! that merely starts with the reserved prefix is never taken for ciphertext (the API
//! refuses such values; [`is_reserved`]). Only a well-formed ciphertext (prefix, key id,
//! base64 of a nonce and at least a tag) is decrypted on read; a prefixed value that is not
//! one is clear text, which `reencrypt` then encrypts.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::Value;

/// Marks an encrypted value; `v1` is this format.
pub(crate) const CIPHERTEXT_PREFIX: &str = "enc:v1:";
/// Bytes of an AES-256 key.
const KEY_BYTES: usize = 32;
/// Bytes of an AES-GCM nonce.
const NONCE_BYTES: usize = 12;
/// Bytes of an AES-GCM authentication tag.
const TAG_BYTES: usize = 16;
/// Longest key id (letters, digits, `-`, `_`).
const MAX_KEY_ID_BYTES: usize = 64;

/// Whether a client-supplied string would read as ciphertext (it starts with the
/// reserved prefix). The API refuses such values.
pub fn is_reserved(text: &str) -> bool {
    text.starts_with(CIPHERTEXT_PREFIX)
}

/// The form in which PII_FIELDS names and property keys are compared: trimmed, ASCII
/// lower case.
pub(crate) fn normalize_field_name(name: &str) -> String {
    name.trim().to_ascii_lowercase()
}

fn is_valid_key_id(key_id: &str) -> bool {
    !key_id.is_empty()
        && key_id.len() <= MAX_KEY_ID_BYTES
        && key_id.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
}

/// A stored string that has the shape of a ciphertext this module wrote: the prefix, a
/// valid key id, and base64 of a nonce plus at least a tag. `None` for anything else,
/// including clear text that happens to start with the prefix.
struct Ciphertext<'a> {
    key_id: &'a str,
    sealed: Vec<u8>,
}

impl<'a> Ciphertext<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        let (key_id, encoded) = text.strip_prefix(CIPHERTEXT_PREFIX)?.split_once(':')?;
        if !is_valid_key_id(key_id) {
            return None;
        }
        let sealed = BASE64.decode(encoded).ok()?;
        (sealed.len() >= NONCE_BYTES + TAG_BYTES).then_some(Self { key_id, sealed })
    }
}

fn as_ciphertext(value: &Value) -> Option<Ciphertext<'_>> {
    match value {
        Value::String(text) => Ciphertext::parse(text),
        _ => None,
    }
}

/// The configured keys, current first.
#[derive(Clone)]
pub struct PiiKeys {
    current_key_id: String,
    ciphers: HashMap<String, Aes256Gcm>,
}

impl std::fmt::Debug for PiiKeys {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.ciphers.keys().collect();
        ids.sort();
        formatter
            .debug_struct("PiiKeys")
            .field("current_key_id", &self.current_key_id)
            .field("key_ids", &ids)
            .finish()
    }
}

impl PiiKeys {
    /// Parses `KEY_ID:BASE64_32_BYTE_KEY` lines (blank lines and `#` comments skipped).
    /// `source` names the variable in errors; key material never appears in them.
    pub fn parse(text: &str, source: &str) -> Result<Self, String> {
        let mut current_key_id = None;
        let mut ciphers = HashMap::new();
        for (index, line) in text.lines().enumerate().map(|(index, line)| (index + 1, line.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key_id, encoded)) = line.split_once(':') else {
                return Err(format!("{source}: line {index}: expected KEY_ID:BASE64_32_BYTE_KEY"));
            };
            let key_id = key_id.trim();
            if !is_valid_key_id(key_id) {
                return Err(format!("{source}: line {index}: key id must be 1-64 of A-Z a-z 0-9 - _"));
            }
            let key = BASE64
                .decode(encoded.trim())
                .map_err(|_| format!("{source}: line {index}: key is not base64"))?;
            if key.len() != KEY_BYTES {
                return Err(format!("{source}: line {index}: key must be 32 bytes, got {}", key.len()));
            }
            let cipher =
                Aes256Gcm::new_from_slice(&key).map_err(|_| format!("{source}: line {index}: bad key"))?;
            if ciphers.insert(key_id.to_string(), cipher).is_some() {
                return Err(format!("{source}: line {index}: duplicate key id {key_id}"));
            }
            current_key_id.get_or_insert_with(|| key_id.to_string());
        }
        let current_key_id = current_key_id.ok_or_else(|| format!("{source}: no key"))?;
        Ok(Self { current_key_id, ciphers })
    }

    pub fn current_key_id(&self) -> &str {
        &self.current_key_id
    }
}

/// Why a stored value could not be decrypted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecryptError {
    #[error("value encrypted with unknown key id {0}")]
    UnknownKey(String),
    #[error("malformed or tampered ciphertext")]
    Corrupt,
}

/// Encrypts and decrypts the sensitive properties of a JSON object. Cheap to clone.
/// Without keys it is off: values pass through unchanged.
#[derive(Clone, Debug, Default)]
pub struct PiiCipher {
    inner: Option<Arc<CipherInner>>,
}

#[derive(Debug)]
struct CipherInner {
    /// PII_FIELDS, normalised ([`normalize_field_name`]).
    fields: BTreeSet<String>,
    keys: PiiKeys,
}

impl PiiCipher {
    pub fn new(fields: impl IntoIterator<Item = String>, keys: PiiKeys) -> Self {
        let fields = fields.into_iter().map(|field| normalize_field_name(&field)).collect();
        Self { inner: Some(Arc::new(CipherInner { fields, keys })) }
    }

    pub(crate) fn disabled() -> Self {
        Self { inner: None }
    }

    /// Encrypts, in place, every value of a sensitive key of a properties object. A value
    /// that looks like ciphertext is encrypted too: callers never vouch for their values.
    pub fn seal(&self, properties: &mut Value) {
        let (Some(inner), Value::Object(object)) = (&self.inner, properties) else { return };
        for (key, value) in object.iter_mut() {
            if inner.is_sensitive(key) {
                *value = Value::String(inner.encrypt(key, value));
            }
        }
    }

    /// `properties` as they are to be stored: a copy with the sensitive values encrypted
    /// as [`PiiCipher::seal`] does, or, when it has no sensitive key, the object itself
    /// (no copy).
    pub(crate) fn sealed<'a>(&self, properties: &'a Value) -> Cow<'a, Value> {
        let (Some(inner), Value::Object(object)) = (&self.inner, properties) else {
            return Cow::Borrowed(properties);
        };
        if !object.keys().any(|key| inner.is_sensitive(key)) {
            return Cow::Borrowed(properties);
        }
        let mut sealed = properties.clone();
        self.seal(&mut sealed);
        Cow::Owned(sealed)
    }

    /// Decrypts, in place, every well-formed ciphertext of a properties object (whatever
    /// its key, so values written under an older PII_FIELDS still read back). Other values,
    /// prefixed or not, are clear text and stay as they are.
    pub fn open(&self, properties: &mut Value) -> Result<(), DecryptError> {
        let Value::Object(object) = properties else { return Ok(()) };
        for (key, value) in object.iter_mut() {
            let Some(ciphertext) = as_ciphertext(value) else { continue };
            let Some(inner) = &self.inner else {
                return Err(DecryptError::UnknownKey(ciphertext.key_id.to_string()));
            };
            *value = inner.decrypt(key, &ciphertext)?;
        }
        Ok(())
    }

    /// Whether a stored object needs `reencrypt`: a sensitive value in clear text
    /// (including clear text that starts with the prefix), or a value encrypted under a key
    /// other than the current one.
    pub(crate) fn needs_reencryption(&self, properties: &Value) -> bool {
        let (Some(inner), Value::Object(object)) = (&self.inner, properties) else { return false };
        object.iter().any(|(key, value)| match as_ciphertext(value) {
            Some(ciphertext) => ciphertext.key_id != inner.keys.current_key_id,
            None => inner.is_sensitive(key) && !value.is_null(),
        })
    }

    /// Decrypts every value and encrypts the sensitive ones under the current key.
    pub(crate) fn reseal(&self, properties: &mut Value) -> Result<(), DecryptError> {
        self.open(properties)?;
        self.seal(properties);
        Ok(())
    }
}

impl CipherInner {
    fn is_sensitive(&self, property_key: &str) -> bool {
        self.fields.contains(&normalize_field_name(property_key))
    }

    fn encrypt(&self, property_key: &str, value: &Value) -> String {
        let key_id = &self.keys.current_key_id;
        let cipher = &self.keys.ciphers[key_id];
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let plaintext = value.to_string();
        let ciphertext = cipher
            .encrypt(&nonce, Payload { msg: plaintext.as_bytes(), aad: property_key.as_bytes() })
            .expect("aes-gcm encryption of an in-memory buffer cannot fail");
        let mut sealed = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        format!("{CIPHERTEXT_PREFIX}{key_id}:{}", BASE64.encode(sealed))
    }

    fn decrypt(&self, property_key: &str, ciphertext: &Ciphertext<'_>) -> Result<Value, DecryptError> {
        let cipher = self
            .keys
            .ciphers
            .get(ciphertext.key_id)
            .ok_or_else(|| DecryptError::UnknownKey(ciphertext.key_id.to_string()))?;
        let (nonce, sealed) = ciphertext.sealed.split_at(NONCE_BYTES);
        let plaintext = cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: property_key.as_bytes() })
            .map_err(|_| DecryptError::Corrupt)?;
        serde_json::from_slice(&plaintext).map_err(|_| DecryptError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY_A: &str = "a:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY_B: &str = "b:HxwdHhscGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";

    fn cipher(keys: &str) -> PiiCipher {
        PiiCipher::new(["email".to_string(), "age".to_string()], PiiKeys::parse(keys, "PII_KEYS").unwrap())
    }

    #[test]
    fn sensitive_values_round_trip_and_others_stay_clear() {
        let cipher = cipher(KEY_A);
        let original = json!({"email": "ada@example.com", "age": 36, "plan": "pro"});
        let mut stored = original.clone();
        cipher.seal(&mut stored);
        let text = stored.to_string();
        assert!(!text.contains("ada@example.com"), "{text}");
        assert!(stored["email"].as_str().unwrap().starts_with("enc:v1:a:"));
        assert_eq!(stored["plan"], "pro");
        let mut read = stored.clone();
        cipher.open(&mut read).unwrap();
        assert_eq!(read, original);
    }

    #[test]
    fn sealed_copies_only_when_a_value_is_to_be_encrypted() {
        let cipher = cipher(KEY_A);
        let clear = json!({"plan": "pro"});
        assert!(matches!(cipher.sealed(&clear), Cow::Borrowed(_)));
        let original = json!({"email": "ada@example.com", "age": 36, "plan": "pro"});
        let sealed = cipher.sealed(&original);
        assert!(matches!(sealed, Cow::Owned(_)));
        assert!(sealed["email"].as_str().unwrap().starts_with("enc:v1:a:"));
        assert!(sealed["age"].as_str().unwrap().starts_with("enc:v1:a:"));
        assert_eq!(sealed["plan"], "pro");
        let mut read = sealed.into_owned();
        cipher.open(&mut read).unwrap();
        assert_eq!(read, original);
        assert!(matches!(PiiCipher::disabled().sealed(&original), Cow::Borrowed(_)));
    }

    #[test]
    fn every_value_gets_its_own_nonce() {
        let cipher = cipher(KEY_A);
        let mut first = json!({"email": "same"});
        let mut second = json!({"email": "same"});
        cipher.seal(&mut first);
        cipher.seal(&mut second);
        assert_ne!(first, second);
    }

    #[test]
    fn old_keys_still_decrypt_after_rotation() {
        let mut stored = json!({"email": "old@example.com"});
        cipher(KEY_A).seal(&mut stored);
        let rotated = cipher(&format!("{KEY_B}\n{KEY_A}"));
        assert!(rotated.needs_reencryption(&stored));
        let mut read = stored.clone();
        rotated.open(&mut read).unwrap();
        assert_eq!(read["email"], "old@example.com");
        rotated.reseal(&mut stored).unwrap();
        assert!(stored["email"].as_str().unwrap().starts_with("enc:v1:b:"));
        assert!(!rotated.needs_reencryption(&stored));
        assert!(cipher(KEY_A).open(&mut stored.clone()).is_err(), "the old key alone cannot read it");
    }

    #[test]
    fn a_ciphertext_moved_to_another_property_or_tampered_does_not_decrypt() {
        let cipher = cipher(KEY_A);
        let mut stored = json!({"email": "ada@example.com"});
        cipher.seal(&mut stored);
        let mut moved = json!({"age": stored["email"].clone()});
        assert_eq!(cipher.open(&mut moved), Err(DecryptError::Corrupt));
        let text = stored["email"].as_str().unwrap();
        let flip_at = text.len() - 8;
        let flipped = if &text[flip_at..=flip_at] == "A" { "B" } else { "A" };
        let mut tampered = json!({"email": format!("{}{flipped}{}", &text[..flip_at], &text[flip_at + 1..])});
        assert_eq!(cipher.open(&mut tampered), Err(DecryptError::Corrupt));
    }

    #[test]
    fn values_shaped_like_ciphertext_are_encrypted_and_read_back_as_sent() {
        let cipher = cipher(KEY_A);
        let mut genuine = json!({"email": "x"});
        cipher.seal(&mut genuine);
        let smuggled = [
            "enc:v1:a:carol@example.org",
            "enc:v1:carol@example.org",
            "enc:v1:zz:carol@example.org",
            genuine["email"].as_str().unwrap(),
        ];
        for value in smuggled {
            let original = json!({"email": value});
            let sealed = cipher.sealed(&original).into_owned();
            let stored = sealed["email"].as_str().unwrap();
            assert!(stored.starts_with("enc:v1:a:") && stored != value, "{value}: stored {stored}");
            let mut read = sealed.clone();
            cipher.open(&mut read).unwrap();
            assert_eq!(read, original, "{value}");
        }
        assert!(is_reserved("enc:v1:anything") && !is_reserved("ENC:v1:") && !is_reserved("x enc:v1:"));
    }

    #[test]
    fn smuggled_clear_text_already_stored_is_reencrypted_not_failed() {
        let cipher = cipher(KEY_A);
        for value in ["enc:v1:a:carol@example.org", "enc:v1:carol@example.org", "enc:v1:zz:AAAA"] {
            let mut stored = json!({"email": value, "plan": "pro"});
            let mut read = stored.clone();
            cipher.open(&mut read).unwrap();
            assert_eq!(read["email"], value, "clear text with the prefix reads back as it is");
            assert!(cipher.needs_reencryption(&stored), "{value}");
            cipher.reseal(&mut stored).unwrap();
            assert!(!stored.to_string().contains("carol"), "{stored}");
            assert!(!cipher.needs_reencryption(&stored));
            cipher.open(&mut stored).unwrap();
            assert_eq!(stored["email"], value);
        }
        let mut not_sensitive = json!({"plan": "enc:v1:carol@example.org"});
        assert!(!cipher.needs_reencryption(&not_sensitive));
        cipher.open(&mut not_sensitive).unwrap();
        assert_eq!(not_sensitive["plan"], "enc:v1:carol@example.org");
    }

    #[test]
    fn field_names_match_trimmed_and_ignoring_ascii_case() {
        let cipher = PiiCipher::new([" Email ".to_string()], PiiKeys::parse(KEY_A, "PII_KEYS").unwrap());
        let mut stored =
            json!({"Email": "a@x", "email ": "b@x", "EMAIL": "c@x", " email": "d@x", "e-mail": "e"});
        cipher.seal(&mut stored);
        for key in ["Email", "email ", "EMAIL", " email"] {
            assert!(stored[key].as_str().unwrap().starts_with("enc:v1:a:"), "{key}: {stored}");
        }
        assert_eq!(stored["e-mail"], "e");
        assert_eq!(normalize_field_name("  PhOnE\t"), "phone");
    }

    #[test]
    fn bad_key_files_name_the_source_and_never_the_key() {
        for text in
            ["", "nocolon", "a:notbase64!", "a:AAAA", "bad id:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="]
        {
            let error = PiiKeys::parse(text, "PII_KEYS_FILE").unwrap_err();
            assert!(error.starts_with("PII_KEYS_FILE"), "{error}");
            assert!(!error.contains("AAECAwQF"), "{error}");
        }
        let duplicate = format!("{KEY_A}\n{KEY_A}");
        assert!(PiiKeys::parse(&duplicate, "PII_KEYS").unwrap_err().contains("duplicate"));
    }
}
