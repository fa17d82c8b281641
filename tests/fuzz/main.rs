//! Property-based fuzzing of the hostile-input path (proptest; cargo-fuzz needs nightly):
//! arbitrary bytes and mutated valid messages go through prost decoding, the
//! `api::convert` TryFrom layer and validation. Nothing may panic, and whatever is
//! accepted must satisfy the documented limits (a valid value, never a half-checked one).
//! Encrypted property values must round-trip whatever they hold.
//!
//! The normal suite runs PROPTEST_CASES (default 256) cases per property. The long run
//! (README, "Fuzzing"): `PROPTEST_CASES=170000 cargo nextest run --test fuzz --test-threads 1`.
//! Failures are persisted under tests/fuzz/proptest-regressions/ and replayed first.

use std::collections::HashMap;

use analytics_service::api::convert;
use analytics_service::models::{IdentifyUser, Properties, TrackEvent};
use analytics_service::pb;
use analytics_service::security::pii::{is_reserved, PiiCipher, PiiKeys};
use analytics_service::service::validation::{MAX_NAME_BYTES, MAX_PROPERTY_KEYS};
use proptest::prelude::*;
use prost::Message;

/// Hand-picked seeds replayed on every run: truncated varints, huge lengths, invalid
/// UTF-8, nested garbage, deep map entries, negative and extreme numbers.
const SEEDS: &[&[u8]] = &[
    &[],
    &[0x0a],
    &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
    &[0x0a, 0x02, 0xff, 0xfe],
    &[0x12, 0x03, b'a', 0xc3, 0x28],
    &[0x1a, 0x06, 0x0a, 0x00, 0x12, 0x02, 0x19, 0x00],
    &[0x1a, 0x0d, 0x0a, 0x01, b'k', 0x12, 0x08, 0x19, 0, 0, 0, 0, 0, 0, 0xf8, 0x7f],
    &[0x20, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
    &[0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
    &[0x0a, 0x01, 0x00],
    &[0x22, 0x04, b'h', b'o', b'u', b'r'],
    &[0x7a, 0x00, 0x0a, 0x01, b'x'],
];

fn fixed_now() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(1_750_000_000, 0).unwrap()
}

fn assert_valid_name(name: &str) {
    assert!(!name.is_empty() && name.len() <= MAX_NAME_BYTES, "{name:?}");
    assert!(!name.chars().any(char::is_control), "{name:?}");
}

fn assert_valid_properties(properties: &Properties) {
    assert!(properties.len() <= MAX_PROPERTY_KEYS);
    for (key, value) in properties.iter() {
        assert_valid_name(key);
        match value {
            serde_json::Value::String(text) => {
                assert!(!text.contains('\0'));
                assert!(!is_reserved(text), "a value that reads as ciphertext: {text:?}");
            }
            serde_json::Value::Number(number) => assert!(number.as_f64().is_some_and(f64::is_finite)),
            serde_json::Value::Bool(_) => {}
            other => panic!("{key:?}: only text, finite numbers and booleans are valid, got {other}"),
        }
    }
    let json = properties.json().to_string();
    assert!(!json.contains("\\u0000"), "PostgreSQL's jsonb refuses NUL");
}

/// Decodes `bytes` as every request type and runs the API's conversion; whatever is
/// accepted must be valid. Returns how many request types accepted the bytes.
fn drive(bytes: &[u8]) -> usize {
    let mut accepted = 0;
    if let Ok(request) = pb::TrackEventRequest::decode(bytes) {
        if let Ok(event) = TrackEvent::try_from(request) {
            assert_valid_name(event.name.as_str());
            if let Some(user) = &event.user_id {
                assert_valid_name(user.as_str());
            }
            assert_valid_properties(&event.properties);
            assert_ne!(event.unix_seconds, Some(0));
            accepted += 1;
        }
    }
    if let Ok(request) = pb::IdentifyUserRequest::decode(bytes) {
        if let Ok(identity) = IdentifyUser::try_from(request) {
            assert_valid_name(identity.user_id.as_str());
            assert_valid_properties(&identity.properties);
            accepted += 1;
        }
    }
    if let Ok(request) = pb::GetEventCountRequest::decode(bytes) {
        if let Ok(filter) = convert::event_filter(request, fixed_now()) {
            assert!(filter.range.end() > filter.range.start());
            if let Some(name) = &filter.event_name {
                assert_valid_name(name.as_str());
            }
            accepted += 1;
        }
    }
    if let Ok(request) = pb::GetUserCountRequest::decode(bytes) {
        if let Ok(range) = convert::user_count_range(&request, fixed_now()) {
            assert!(range.end() > range.start());
            accepted += 1;
        }
    }
    accepted
}

#[test]
fn seeds_never_panic() {
    for seed in SEEDS {
        drive(seed);
    }
}

#[test]
fn values_that_read_as_ciphertext_are_never_accepted() {
    use pb::property_value::Value;
    let request = pb::TrackEventRequest {
        event_name: "signup".into(),
        properties: [(
            "email".to_string(),
            pb::PropertyValue { value: Some(Value::StringValue("enc:v1:k1:carol@example.org".into())) },
        )]
        .into(),
        ..Default::default()
    };
    drive(&request.encode_to_vec());
    assert!(TrackEvent::try_from(request).is_err());
}

fn property_value() -> impl Strategy<Value = pb::PropertyValue> {
    use pb::property_value::Value;
    prop_oneof![
        any::<String>().prop_map(|text| Some(Value::StringValue(text))),
        any::<f64>().prop_map(|number| Some(Value::NumberValue(number))),
        any::<bool>().prop_map(|flag| Some(Value::BoolValue(flag))),
        Just(None),
    ]
    .prop_map(|value| pb::PropertyValue { value })
}

/// Strings biased to the edges: empty, control characters, SQL, long, non-ASCII.
fn edgy_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[\\x00-\\x1f'\";-]{0,8}",
        Just("'; DROP TABLE events; --".to_string()),
        "[a-z]{250,260}",
        "\\PC{0,40}",
        "enc:v1:[a-z0-9:@.]{0,12}",
    ]
}

fn track_request() -> impl Strategy<Value = pb::TrackEventRequest> {
    (
        edgy_string(),
        edgy_string(),
        prop::collection::hash_map(edgy_string(), property_value(), 0..6),
        any::<i64>(),
        edgy_string(),
    )
        .prop_map(|(event_name, user_id, properties, timestamp, insert_id)| pb::TrackEventRequest {
            event_name,
            user_id,
            properties: properties.into_iter().collect::<HashMap<_, _>>(),
            timestamp,
            insert_id,
        })
}

fn test_cipher() -> PiiCipher {
    let keys = PiiKeys::parse("k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "PII_KEYS").unwrap();
    PiiCipher::new(["email".to_string()], keys)
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct("tests/fuzz/proptest-regressions/fuzz.txt"),
        )),
        ..ProptestConfig::default()
    })]

    /// Arbitrary bytes: decode errors are fine, panics and invalid acceptances are not.
    #[test]
    fn arbitrary_bytes_are_rejected_or_valid(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        drive(&bytes);
    }

    /// Valid encodings of edgy requests, then flipped and truncated bytes.
    #[test]
    fn mutated_requests_are_rejected_or_valid(
        request in track_request(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        keep in any::<prop::sample::Index>(),
    ) {
        let mut bytes = request.encode_to_vec();
        drive(&bytes);
        if !bytes.is_empty() {
            for (index, value) in flips {
                let position = index.index(bytes.len());
                bytes[position] ^= value;
            }
            drive(&bytes);
            let length = keep.index(bytes.len() + 1);
            drive(&bytes[..length]);
        }
    }

    /// Whatever a sensitive value holds, it is stored encrypted and reads back the same.
    #[test]
    fn encrypted_values_round_trip(text in any::<String>(), number in any::<f64>().prop_filter("finite", |n| n.is_finite())) {
        let cipher = test_cipher();
        for value in [serde_json::Value::String(text.clone()), serde_json::json!(number)] {
            let original = serde_json::json!({ "email": value, "other": "clear" });
            let mut stored = original.clone();
            cipher.seal(&mut stored);
            prop_assert!(stored["email"].as_str().unwrap().starts_with("enc:v1:k1:"));
            cipher.open(&mut stored).unwrap();
            prop_assert_eq!(stored, original);
        }
    }
}
