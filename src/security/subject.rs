//! The keyed hash that names a user wherever its id must not be stored in clear: the
//! suppression list, erasure requests once completed, and the audit trail of the
//! administrative RPCs. HMAC-SHA256 of the user id's bytes under a 32-byte key read from
//! SUPPRESSION_KEY_FILE (base64, a mounted Secret like PII_KEYS_FILE).
//!
//! Without the key the hash of a guessable id could be found by trying ids; with it, a
//! dump of the database does not reveal which user a suppression or an audit record
//! names. Changing the key orphans every stored hash: suppressions stop matching (they
//! are lifted in effect) and old audit records no longer match new ones.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the key (and of a hash).
pub(crate) const SUBJECT_KEY_BYTES: usize = 32;

/// The keyed hash of one user id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubjectHash(pub [u8; 32]);

impl SubjectHash {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Lower-case hex, as the API and the logs show it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }
}

impl std::fmt::Debug for SubjectHash {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "SubjectHash({})", self.to_hex())
    }
}

/// Computes [`SubjectHash`]es. Cheap to clone.
#[derive(Clone)]
pub struct SubjectHasher {
    /// The keyed state before any input: cloned per hash instead of re-keying.
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for SubjectHasher {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SubjectHasher(..)")
    }
}

impl SubjectHasher {
    /// A hasher keyed with `key`.
    pub fn new(key: &[u8; SUBJECT_KEY_BYTES]) -> Self {
        Self { keyed: Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length") }
    }

    /// Parses the key file's text: the base64 of exactly 32 bytes (surrounding white
    /// space ignored). The error names `variable`, never the key.
    pub fn parse(text: &str, variable: &str) -> Result<Self, String> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|_| format!("{variable}: the file must hold the base64 of a 32-byte key"))?;
        let key: [u8; SUBJECT_KEY_BYTES] = bytes.try_into().map_err(|bytes: Vec<u8>| {
            format!("{variable}: the key must be 32 bytes, the file holds {}", bytes.len())
        })?;
        Ok(Self::new(&key))
    }

    /// The hash of `user_id`.
    pub fn hash(&self, user_id: &str) -> SubjectHash {
        let mut mac = self.keyed.clone();
        mac.update(user_id.as_bytes());
        SubjectHash(mac.finalize().into_bytes().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_an_independent_hmac_sha256() {
        // HMAC-SHA256(key = 32 x 0x0b, "Hi There") computed independently, with Python's
        // hmac module.
        let hasher = SubjectHasher::new(&[0x0b; 32]);
        assert_eq!(
            hasher.hash("Hi There").to_hex(),
            "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"
        );
    }

    #[test]
    fn the_key_file_holds_the_base64_of_32_bytes() {
        let key = BASE64.encode([7u8; 32]);
        let hasher = SubjectHasher::parse(&format!("  {key}\n"), "SUPPRESSION_KEY_FILE").unwrap();
        assert_eq!(hasher.hash("u1"), SubjectHasher::new(&[7u8; 32]).hash("u1"));
        assert_ne!(hasher.hash("u1"), hasher.hash("u2"));
        assert_ne!(hasher.hash("u1"), SubjectHasher::new(&[8u8; 32]).hash("u1"));
        for bad in ["", "not base64!", &BASE64.encode([1u8; 16])] {
            let error = SubjectHasher::parse(bad, "SUPPRESSION_KEY_FILE").unwrap_err();
            assert!(error.starts_with("SUPPRESSION_KEY_FILE:"), "{error}");
        }
    }
}
