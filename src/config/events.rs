//! The sections of the event rules: accepted ages and retention (EVENT_*), group
//! commit (INGEST_*, IDEMPOTENCY_WINDOW_DAYS), rate limits (RATE_LIMIT_*) and PII
//! encryption (PII_*).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::postgres::RetryConfig;
use super::values::{check_range, non_empty_path};
use super::{read_section, ConfigError, Vars};
use crate::security::pii::PiiKeys;
use crate::security::subject::SubjectHasher;

/// Which event times are accepted and how long events are kept.
#[derive(Clone, Copy, Debug)]
pub struct EventsConfig {
    /// EVENT_MAX_AGE_DAYS: oldest accepted event timestamp, before now.
    pub max_age: chrono::Duration,
    /// EVENT_RETENTION_DAYS: events older than this are deleted by dropping whole
    /// monthly partitions; `None` keeps them forever.
    pub retention: Option<chrono::Duration>,
}

impl EventsConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default = "default_event_max_age_days")]
            event_max_age_days: u32,
            #[serde(default)]
            event_retention_days: u32,
        }
        let raw: Raw = read_section(vars)?;
        if raw.event_max_age_days == 0 {
            return Err(ConfigError::variable("EVENT_MAX_AGE_DAYS", "must be at least 1"));
        }
        if raw.event_retention_days != 0 && raw.event_retention_days < raw.event_max_age_days {
            return Err(ConfigError::variable(
                "EVENT_RETENTION_DAYS",
                "must be 0 (keep forever) or at least EVENT_MAX_AGE_DAYS",
            ));
        }
        let days = |days: u32| chrono::Duration::days(i64::from(days));
        Ok(Self {
            max_age: days(raw.event_max_age_days),
            retention: (raw.event_retention_days > 0).then(|| days(raw.event_retention_days)),
        })
    }
}

/// The group commit of event writes.
#[derive(Clone, Copy, Debug)]
pub struct IngestConfig {
    /// INGEST_BATCH_SIZE: most events per group commit (a call is never split).
    pub batch_size: usize,
    /// INGEST_LINGER_MS: while other group commits are in flight, the longest a batch
    /// that is not full waits for more events; zero commits what is queued at once. With
    /// no commit in flight a batch never waits.
    pub linger: Duration,
    /// INGEST_QUEUE_CAPACITY: most events waiting for or inside a group commit.
    pub queue_capacity: usize,
    /// INGEST_WRITERS: group commits in flight at once (one pooled connection each).
    pub writers: usize,
    /// INGEST_COMMIT_TIMEOUT_MS: longest a group-commit statement may run.
    pub commit_timeout: Duration,
    /// IDEMPOTENCY_WINDOW_DAYS: how long an insert_id is remembered.
    pub idempotency_window_days: u32,
    /// DB_RETRY_*: retries of a commit that stored nothing.
    pub retry: RetryConfig,
}

impl IngestConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default = "default_ingest_batch_size")]
            ingest_batch_size: usize,
            #[serde(default = "default_ingest_linger_ms")]
            ingest_linger_ms: u64,
            #[serde(default = "default_ingest_queue_capacity")]
            ingest_queue_capacity: usize,
            #[serde(default = "default_ingest_writers")]
            ingest_writers: usize,
            #[serde(default = "default_ingest_commit_timeout_ms")]
            ingest_commit_timeout_ms: u64,
            #[serde(default = "default_idempotency_window_days")]
            idempotency_window_days: u32,
        }
        let raw: Raw = read_section(vars)?;
        let retry = RetryConfig::load(vars)?;
        check_range("INGEST_BATCH_SIZE", raw.ingest_batch_size, 1, 10_000)?;
        if raw.ingest_linger_ms > 100 {
            return Err(ConfigError::variable("INGEST_LINGER_MS", "must be at most 100"));
        }
        check_range("INGEST_QUEUE_CAPACITY", raw.ingest_queue_capacity, 1, 1_000_000)?;
        if raw.ingest_writers == 0 {
            return Err(ConfigError::variable(
                "INGEST_WRITERS",
                "must be between 1 and POSTGRES_MAX_CONNECTIONS - 2 (the writers' pool holds INGEST_WRITERS + 1 of the connections, at least one serves reads)",
            ));
        }
        check_range("INGEST_COMMIT_TIMEOUT_MS", raw.ingest_commit_timeout_ms, 50, 60_000)?;
        check_range("IDEMPOTENCY_WINDOW_DAYS", raw.idempotency_window_days, 1, 365)?;
        Ok(Self {
            batch_size: raw.ingest_batch_size,
            linger: Duration::from_millis(raw.ingest_linger_ms),
            queue_capacity: raw.ingest_queue_capacity,
            writers: raw.ingest_writers,
            commit_timeout: Duration::from_millis(raw.ingest_commit_timeout_ms),
            idempotency_window_days: raw.idempotency_window_days,
            retry,
        })
    }
}

/// Per-user event budgets.
#[derive(Clone, Copy, Debug)]
pub struct RateLimitConfig {
    /// RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE: token bucket size per user; 0 = unlimited.
    pub events_per_user_per_minute: u32,
    /// RATE_LIMIT_EXPECTED_REPLICAS: replicas sharing the Redis budgets. While Redis is
    /// unreachable each replica limits alone with budget / this (at least 1 event).
    pub expected_replicas: u32,
    /// RATE_LIMIT_LEASE_TOKENS: tokens a replica takes from a key's shared budget when it
    /// has to ask Redis anyway (its events' tokens, topped up to this many); the rest are
    /// spent by the key's next events on that replica without a round trip. `None` =
    /// [`RateLimitConfig::lease_tokens`] picks it from the budget; 1 = no leases.
    pub lease_tokens: Option<u32>,
}

impl RateLimitConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default = "default_rate_limit_per_minute")]
            rate_limit_events_per_user_per_minute: u32,
            #[serde(default = "default_rate_limit_expected_replicas")]
            rate_limit_expected_replicas: u32,
            rate_limit_lease_tokens: Option<u32>,
        }
        let raw: Raw = read_section(vars)?;
        check_range("RATE_LIMIT_EXPECTED_REPLICAS", raw.rate_limit_expected_replicas, 1, 1_000)?;
        if let Some(lease_tokens) = raw.rate_limit_lease_tokens {
            check_range("RATE_LIMIT_LEASE_TOKENS", lease_tokens, 1, 1_000)?;
        }
        Ok(Self {
            events_per_user_per_minute: raw.rate_limit_events_per_user_per_minute,
            expected_replicas: raw.rate_limit_expected_replicas,
            lease_tokens: raw.rate_limit_lease_tokens,
        })
    }

    /// The tokens of one lease: RATE_LIMIT_LEASE_TOKENS, else 1/64 of the budget (at most
    /// 16), so the leases left over on a replica add at most about 1.5% of the budget to
    /// what a key can spend in a window; 1 (no leases) for budgets under 128 a minute.
    pub fn lease_tokens(&self) -> u32 {
        self.lease_tokens.unwrap_or((self.events_per_user_per_minute / 64).clamp(1, 16))
    }
}

/// Encryption at rest of sensitive property values.
#[derive(Clone, Debug)]
pub struct PiiConfig {
    /// PII_FIELDS: property keys whose values are encrypted at rest.
    pub fields: Vec<String>,
    /// PII_KEYS_FILE: file of `KEY_ID:BASE64_32_BYTE_KEY` lines, the first encrypting
    /// new writes; `None` = encryption off.
    pub keys_file: Option<PathBuf>,
    /// SUPPRESSION_KEY_FILE: the base64 of the 32-byte key of the user ids' keyed hash
    /// (suppression list, erasure requests, audit); `None` = the administrative RPCs
    /// answer FAILED_PRECONDITION and ingestion checks no suppression.
    pub suppression_key_file: Option<PathBuf>,
}

impl PiiConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default = "default_pii_fields")]
            pii_fields: String,
            #[serde(default)]
            pii_keys_file: String,
            #[serde(default)]
            suppression_key_file: String,
        }
        let raw: Raw = read_section(vars)?;
        let fields = raw
            .pii_fields
            .split(',')
            .map(str::trim)
            .filter(|field| !field.is_empty())
            .map(String::from)
            .collect();
        Ok(Self {
            fields,
            keys_file: non_empty_path(&raw.pii_keys_file),
            suppression_key_file: non_empty_path(&raw.suppression_key_file),
        })
    }

    /// The keys from PII_KEYS_FILE; `None` when it is not set (encryption off). Reads
    /// the file, so it is called at start-up, not while parsing.
    pub fn keys(&self) -> Result<Option<PiiKeys>, ConfigError> {
        let Some(path) = &self.keys_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigError(format!("PII_KEYS_FILE: cannot read {}: {error}", path.display()))
        })?;
        PiiKeys::parse(&text, "PII_KEYS_FILE").map(Some).map_err(ConfigError)
    }

    /// The keyed hash of SUPPRESSION_KEY_FILE; `None` when it is not set. Reads the
    /// file, so it is called at start-up, not while parsing.
    pub fn subject_hasher(&self) -> Result<Option<SubjectHasher>, ConfigError> {
        let Some(path) = &self.suppression_key_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigError(format!("SUPPRESSION_KEY_FILE: cannot read {}: {error}", path.display()))
        })?;
        SubjectHasher::parse(&text, "SUPPRESSION_KEY_FILE").map(Some).map_err(ConfigError)
    }
}

fn default_event_max_age_days() -> u32 {
    30
}
fn default_ingest_batch_size() -> usize {
    500
}
fn default_ingest_linger_ms() -> u64 {
    2
}
fn default_ingest_queue_capacity() -> usize {
    10_000
}
fn default_ingest_writers() -> usize {
    2
}
fn default_ingest_commit_timeout_ms() -> u64 {
    1_000
}
fn default_idempotency_window_days() -> u32 {
    7
}
fn default_rate_limit_per_minute() -> u32 {
    1_000
}
fn default_rate_limit_expected_replicas() -> u32 {
    1
}
fn default_pii_fields() -> String {
    "email,phone,name,ip_address".into()
}
