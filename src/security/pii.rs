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

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::Value;

/// Marks an encrypted value; `v1` is this format.
pub const CIPHERTEXT_PREFIX: &str = "enc:v1:";
/// Bytes of an AES-256 key.
const KEY_BYTES: usize = 32;
/// Bytes of an AES-GCM nonce.
const NONCE_BYTES: usize = 12;
/// Longest key id (letters, digits, `-`, `_`).
const MAX_KEY_ID_BYTES: usize = 64;

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
            let valid_id = !key_id.is_empty()
                && key_id.len() <= MAX_KEY_ID_BYTES
                && key_id.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
            if !valid_id {
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
    fields: BTreeSet<String>,
    keys: PiiKeys,
}

impl PiiCipher {
    pub fn new(fields: impl IntoIterator<Item = String>, keys: PiiKeys) -> Self {
        Self { inner: Some(Arc::new(CipherInner { fields: fields.into_iter().collect(), keys })) }
    }

    pub fn disabled() -> Self {
        Self { inner: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub fn current_key_id(&self) -> Option<&str> {
        self.inner.as_ref().map(|inner| inner.keys.current_key_id())
    }

    /// Encrypts, in place, the values of sensitive keys of a properties object. Values
    /// already encrypted are left alone.
    pub fn seal(&self, properties: &mut Value) {
        let (Some(inner), Value::Object(object)) = (&self.inner, properties) else { return };
        for (key, value) in object.iter_mut() {
            if inner.fields.contains(key) && !is_ciphertext(value) {
                *value = Value::String(inner.encrypt(key, value));
            }
        }
    }

    /// `properties` as they are to be stored: a copy with the sensitive values encrypted
    /// as [`PiiCipher::seal`] does, or, when none needs it, the object itself (no copy).
    pub fn sealed<'a>(&self, properties: &'a Value) -> Cow<'a, Value> {
        let (Some(inner), Value::Object(object)) = (&self.inner, properties) else {
            return Cow::Borrowed(properties);
        };
        if !object.iter().any(|(key, value)| inner.fields.contains(key) && !is_ciphertext(value)) {
            return Cow::Borrowed(properties);
        }
        let mut sealed = properties.clone();
        self.seal(&mut sealed);
        Cow::Owned(sealed)
    }

    /// Decrypts, in place, every encrypted value of a properties object (whatever its
    /// key, so values written under an older PII_FIELDS still read back).
    pub fn open(&self, properties: &mut Value) -> Result<(), DecryptError> {
        let Value::Object(object) = properties else { return Ok(()) };
        for (key, value) in object.iter_mut() {
            if let Value::String(text) = value {
                if let Some(payload) = text.strip_prefix(CIPHERTEXT_PREFIX) {
                    let Some(inner) = &self.inner else {
                        return Err(DecryptError::UnknownKey(payload.split(':').next().unwrap_or("").into()));
                    };
                    *value = inner.decrypt(key, payload)?;
                }
            }
        }
        Ok(())
    }

    /// Whether a stored object needs `reencrypt`: a sensitive value in clear text, or a
    /// value encrypted under a key other than the current one.
    pub fn needs_reencryption(&self, properties: &Value) -> bool {
        let (Some(inner), Value::Object(object)) = (&self.inner, properties) else { return false };
        object.iter().any(|(key, value)| match value {
            Value::String(text) if text.starts_with(CIPHERTEXT_PREFIX) => {
                !text[CIPHERTEXT_PREFIX.len()..].starts_with(&format!("{}:", inner.keys.current_key_id))
            }
            _ => inner.fields.contains(key) && !value.is_null(),
        })
    }

    /// Decrypts every value and encrypts the sensitive ones under the current key.
    pub fn reseal(&self, properties: &mut Value) -> Result<(), DecryptError> {
        self.open(properties)?;
        self.seal(properties);
        Ok(())
    }
}

fn is_ciphertext(value: &Value) -> bool {
    matches!(value, Value::String(text) if text.starts_with(CIPHERTEXT_PREFIX))
}

impl CipherInner {
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

    fn decrypt(&self, property_key: &str, payload: &str) -> Result<Value, DecryptError> {
        let (key_id, encoded) = payload.split_once(':').ok_or(DecryptError::Corrupt)?;
        let cipher =
            self.keys.ciphers.get(key_id).ok_or_else(|| DecryptError::UnknownKey(key_id.to_string()))?;
        let sealed = BASE64.decode(encoded).map_err(|_| DecryptError::Corrupt)?;
        if sealed.len() < NONCE_BYTES {
            return Err(DecryptError::Corrupt);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
        let plaintext = cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: property_key.as_bytes() })
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
        assert!(matches!(cipher.sealed(&sealed), Cow::Borrowed(_)), "sealed values are left alone");
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
        let mut tampered = json!({"email": format!("{}x", stored["email"].as_str().unwrap())});
        assert!(cipher.open(&mut tampered).is_err());
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
