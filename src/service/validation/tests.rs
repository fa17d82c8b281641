//! Unit tests of the input rules.

use super::*;

fn string(text: &str) -> Option<PropertyValue> {
    Some(PropertyValue::String(text.to_string()))
}

#[test]
fn event_name_rules() {
    let cases: &[(&str, String, Option<&str>)] = &[
        ("valid", "page_view".into(), None),
        ("empty", String::new(), Some("must not be empty")),
        ("255 bytes", "a".repeat(255), None),
        ("256 bytes", "a".repeat(256), Some("at most 255 bytes")),
        ("multi-byte over limit", "é".repeat(128), Some("at most 255 bytes")),
        ("newline", "page\nview".into(), Some("control characters")),
        ("nul", "page\0view".into(), Some("control characters")),
        ("unicode", "página_vista".into(), None),
    ];
    for (name, raw, expected) in cases {
        let result = EventName::parse(raw.clone());
        match expected {
            None => assert!(result.is_ok(), "{name}: {result:?}"),
            Some(reason) => {
                let error = result.expect_err(name);
                assert_eq!(error.field, "event_name", "{name}");
                assert!(error.reason.contains(reason), "{name}: {error}");
            }
        }
    }
}

#[test]
fn user_id_rules() {
    assert_eq!(UserId::parse_optional(String::new()).unwrap(), None);
    assert!(UserId::parse_optional("user-1".into()).unwrap().is_some());
    let cases = [
        (String::new(), "must not be empty"),
        ("u".repeat(256), "at most 255 bytes"),
        ("user\t1".into(), "control characters"),
    ];
    for (raw, reason) in cases {
        let error = UserId::parse(raw).unwrap_err();
        assert_eq!(error.field, "user_id");
        assert!(error.reason.contains(reason), "{error}");
    }
    let error = UserId::parse_optional("a\u{7}".into()).unwrap_err();
    assert_eq!(error.field, "user_id");
}

#[test]
fn property_rules() {
    type Case = (&'static str, Vec<(String, Option<PropertyValue>)>, Option<(&'static str, &'static str)>);
    let too_many: Vec<_> =
        (0..=MAX_PROPERTY_KEYS).map(|i| (format!("k{i}"), Some(PropertyValue::Bool(true)))).collect();
    let max_keys: Vec<_> =
        (0..MAX_PROPERTY_KEYS).map(|i| (format!("k{i}"), Some(PropertyValue::Bool(true)))).collect();
    let cases: Vec<Case> = vec![
        (
            "valid mix",
            vec![
                ("page".into(), string("/")),
                ("n".into(), Some(PropertyValue::Number(1.5))),
                ("b".into(), Some(PropertyValue::Bool(false))),
            ],
            None,
        ),
        ("256 keys", max_keys, None),
        ("257 keys", too_many, Some(("properties", "at most 256 keys"))),
        (
            "empty key",
            vec![(String::new(), string("x"))],
            Some(("properties[\"\"]", "key must be 1 to 255 bytes")),
        ),
        (
            "long key",
            vec![("k".repeat(256), string("x"))],
            Some(("properties[", "key must be 1 to 255 bytes")),
        ),
        (
            "control in key",
            vec![("a\nb".into(), string("x"))],
            Some(("properties[\"a\\nb\"]", "control characters")),
        ),
        ("nul in value", vec![("page".into(), string("a\0b"))], Some(("properties[\"page\"]", "NUL"))),
        (
            "nan",
            vec![("n".into(), Some(PropertyValue::Number(f64::NAN)))],
            Some(("properties[\"n\"]", "finite")),
        ),
        (
            "infinity",
            vec![("n".into(), Some(PropertyValue::Number(f64::INFINITY)))],
            Some(("properties[\"n\"]", "finite")),
        ),
        ("unset value", vec![("v".into(), None)], Some(("properties[\"v\"]", "must be set"))),
        (
            "reserved prefix",
            vec![("email".into(), string("enc:v1:k1:carol@example.org"))],
            Some(("properties[\"email\"]", "reserved prefix enc:v1:")),
        ),
        ("prefix inside a value", vec![("note".into(), string("see enc:v1:"))], None),
    ];
    for (name, raw, expected) in cases {
        let result = Properties::parse(raw);
        match expected {
            None => assert!(result.is_ok(), "{name}: {result:?}"),
            Some((field, reason)) => {
                let error = result.expect_err(name);
                assert!(error.field.starts_with(field), "{name}: {error}");
                assert!(error.reason.contains(reason), "{name}: {error}");
            }
        }
    }
}

#[test]
fn insert_id_rules() {
    assert_eq!(InsertId::parse_optional(String::new()).unwrap(), None);
    assert_eq!(InsertId::parse_optional("a-1".into()).unwrap().unwrap().as_str(), "a-1");
    assert!(InsertId::parse_optional("i".repeat(255)).unwrap().is_some());
    let too_long = InsertId::parse_optional("i".repeat(256)).unwrap_err();
    assert_eq!(too_long.field, "insert_id");
    let control = InsertId::parse_optional("a\tb".into()).unwrap_err();
    assert_eq!(control.field, "insert_id");
}

#[test]
fn batch_limits() {
    assert!(check_batch(1, 10).is_ok());
    assert!(check_batch(MAX_BATCH_EVENTS, MAX_BATCH_BYTES).is_ok());
    let cases = [
        (0, 10, "must not be empty"),
        (MAX_BATCH_EVENTS + 1, 10, "at most 1000 events"),
        (1, MAX_BATCH_BYTES + 1, "at most 1048576"),
    ];
    for (count, bytes, reason) in cases {
        let error = check_batch(count, bytes).unwrap_err();
        assert_eq!(error.field, "events");
        assert!(error.reason.contains(reason), "{error}");
    }
}

#[test]
fn properties_size_limit_is_exact() {
    // {"k":"<text>"} is 8 bytes of framing around the text.
    let framing = r#"{"k":""}"#.len();
    let at_limit = "x".repeat(MAX_PROPERTIES_BYTES - framing);
    assert!(Properties::parse([("k".to_string(), string(&at_limit))]).is_ok());
    let over = "x".repeat(MAX_PROPERTIES_BYTES - framing + 1);
    let error = Properties::parse([("k".to_string(), string(&over))]).unwrap_err();
    assert_eq!(error.field, "properties");
    assert!(error.reason.contains("exceeds maximum size"), "{error}");
}

#[test]
fn timestamp_rules() {
    let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let max_age = Duration::days(30);
    let cases: &[(&str, Option<i64>, Result<i64, &str>)] = &[
        ("absent means now", None, Ok(1_700_000_000)),
        ("past", Some(1_700_000_000 - 86_400), Ok(1_700_000_000 - 86_400)),
        ("one hour ahead", Some(1_700_000_000 + 3_600), Ok(1_700_003_600)),
        ("too far ahead", Some(1_700_000_000 + 3_601), Err("future")),
        ("oldest allowed", Some(1_700_000_000 - 30 * 86_400), Ok(1_700_000_000 - 30 * 86_400)),
        ("too old", Some(1_700_000_000 - 30 * 86_400 - 1), Err("in the past")),
        ("out of range", Some(i64::MAX), Err("out of range")),
        ("before year 1", Some(-300_000_000_000), Err("out of range")),
        ("i64::MIN", Some(i64::MIN), Err("out of range")),
    ];
    for (name, input, expected) in cases {
        let result = event_timestamp(*input, now, max_age);
        match expected {
            Ok(seconds) => assert_eq!(result.unwrap().timestamp(), *seconds, "{name}"),
            Err(reason) => {
                let error = result.expect_err(name);
                assert_eq!(error.field, "timestamp");
                assert!(error.reason.contains(reason), "{name}: {error}");
            }
        }
    }
}

#[test]
fn time_range_and_grouping_rules() {
    let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    assert_eq!(TimeRange::parse(10, 0, now).unwrap().end(), 1_700_000_001, "now is the next whole second");
    let later_in_the_second = DateTime::from_timestamp(1_700_000_000, 999_999_000).unwrap();
    assert_eq!(TimeRange::parse(10, 0, later_in_the_second).unwrap().end(), 1_700_000_001);
    assert_eq!(TimeRange::parse(10, 10, now).unwrap_err().field, "end_time");
    assert_eq!(TimeRange::parse(10, 5, now).unwrap_err().field, "end_time");
    for (start, end, field) in [
        (i64::MIN, 5, "start_time"),
        (-300_000_000_000, 5, "start_time"),
        (MIN_UNIX_SECONDS - 1, 5, "start_time"),
        (10, MAX_UNIX_SECONDS + 1, "end_time"),
        (10, i64::MAX, "end_time"),
        (i64::MIN, i64::MAX, "start_time"),
    ] {
        let error = TimeRange::parse(start, end, now).unwrap_err();
        assert_eq!(error.field, field, "[{start}, {end})");
        assert!(error.reason.contains("out of range"), "{error}");
    }
    assert!(TimeRange::parse(MIN_UNIX_SECONDS, MAX_UNIX_SECONDS, now).is_ok());

    assert_eq!(GroupBy::parse("").unwrap(), None);
    assert_eq!(GroupBy::parse("week").unwrap(), Some(GroupBy::Week));
    let error = GroupBy::parse("month").unwrap_err();
    assert_eq!(error.field, "group_by");
    assert!(GroupBy::parse("Hour").is_err());

    let ten_thousand_hours = TimeRange::parse(0, 10_000 * 3_600, now).unwrap();
    assert!(GroupBy::Hour.check_bucket_count(ten_thousand_hours).is_ok());
    let one_more = TimeRange::parse(0, 10_000 * 3_600 + 1, now).unwrap();
    let error = GroupBy::Hour.check_bucket_count(one_more).unwrap_err();
    assert_eq!(error.field, "group_by");
    assert!(GroupBy::Week.check_bucket_count(one_more).is_ok());
}
