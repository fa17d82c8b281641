//! The telemetry section: the service's name, logs (LOG_LEVEL, LOG_FORMAT) and trace
//! export over OTLP (OTEL_*), the header list parsed at load time.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use super::values::{non_empty_path, parse_named, Secret};
use super::{read_section, ConfigError, Vars};

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (production).
    #[default]
    Json,
    /// Human-readable lines (development).
    Text,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw.to_ascii_lowercase().as_str() {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            _ => Err(format!("expected json or text, got {raw:?}")),
        }
    }
}

fn log_format<'de, D: Deserializer<'de>>(deserializer: D) -> Result<LogFormat, D::Error> {
    parse_named(deserializer, "LOG_FORMAT")
}

/// Logs and traces.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// SERVICE_NAME: name in logs, traces and metrics.
    pub service_name: String,
    /// LOG_LEVEL: a tracing filter, e.g. `info` or `info,analytics_service=debug`.
    pub log_level: String,
    /// LOG_FORMAT: `json` (default) or `text`.
    pub log_format: LogFormat,
    /// Trace export; `None` when OTEL_EXPORTER_OTLP_ENDPOINT is empty.
    pub otlp: Option<OtlpConfig>,
}

/// Where and how traces are exported.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// OTEL_EXPORTER_OTLP_ENDPOINT: OTLP/gRPC collector, `http://` or `https://`.
    pub endpoint: String,
    /// OTEL_EXPORTER_OTLP_CERTIFICATE: PEM bundle of the CAs trusted for an `https://`
    /// collector, in addition to the system roots.
    pub certificate: Option<PathBuf>,
    /// OTEL_EXPORTER_OTLP_HEADERS, parsed. A broken list turns trace export off at
    /// start-up (logged, naming the variable) rather than stopping the service.
    pub headers: Result<OtlpHeaders, ConfigError>,
    /// OTEL_TRACES_SAMPLER_RATIO: share of root traces sampled, 0.0 to 1.0 (parent-based).
    pub sampler_ratio: f64,
}

/// OTLP export headers as (name, value) pairs, names lower-cased and values
/// percent-decoded. Values never print (they are often tokens).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct OtlpHeaders(pub Vec<(String, String)>);

impl fmt::Debug for OtlpHeaders {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_list().entries(self.0.iter().map(|(name, _)| format!("{name}=***"))).finish()
    }
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default = "super::server::default_service_name")]
    service_name: String,
    #[serde(default = "default_log_level")]
    log_level: String,
    #[serde(default, deserialize_with = "log_format")]
    log_format: LogFormat,
    #[serde(default)]
    otel_exporter_otlp_endpoint: String,
    #[serde(default)]
    otel_exporter_otlp_certificate: String,
    #[serde(default)]
    otel_exporter_otlp_headers: Secret,
    #[serde(default = "default_sampler_ratio")]
    otel_traces_sampler_ratio: f64,
}

impl TelemetryConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let raw: Raw = read_section(vars)?;
        if raw.service_name.trim().is_empty() {
            return Err(ConfigError::variable("SERVICE_NAME", "must not be empty"));
        }
        if !(0.0..=1.0).contains(&raw.otel_traces_sampler_ratio) {
            return Err(ConfigError::variable("OTEL_TRACES_SAMPLER_RATIO", "must be between 0.0 and 1.0"));
        }
        let endpoint = raw.otel_exporter_otlp_endpoint.trim();
        let otlp = (!endpoint.is_empty()).then(|| OtlpConfig {
            endpoint: endpoint.to_string(),
            certificate: non_empty_path(&raw.otel_exporter_otlp_certificate),
            headers: parse_otlp_headers(raw.otel_exporter_otlp_headers.expose()),
            sampler_ratio: raw.otel_traces_sampler_ratio,
        });
        Ok(Self {
            service_name: raw.service_name,
            log_level: raw.log_level,
            log_format: raw.log_format,
            otlp,
        })
    }
}

/// Parses the OpenTelemetry `key=value,key2=value2` header list (W3C baggage-like:
/// surrounding white space trimmed, values percent-decoded). The error names the
/// variable, never a value.
pub(super) fn parse_otlp_headers(raw: &str) -> Result<OtlpHeaders, ConfigError> {
    let fail = |reason: String| ConfigError::variable("OTEL_EXPORTER_OTLP_HEADERS", reason);
    let mut headers = Vec::new();
    for (index, pair) in raw.split(',').enumerate() {
        if pair.trim().is_empty() {
            continue;
        }
        let position = index + 1;
        let (name, value) =
            pair.split_once('=').ok_or_else(|| fail(format!("entry {position} is not key=value")))?;
        let name = name.trim().to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() || name.is_empty() {
            return Err(fail(format!("entry {position} has an invalid header name")));
        }
        let value = percent_decode(value.trim())
            .filter(|value| http::HeaderValue::from_str(value).is_ok())
            .ok_or_else(|| fail(format!("entry {position} ({name}) has an invalid value")))?;
        headers.push((name, value));
    }
    Ok(OtlpHeaders(headers))
}

/// `%XX` escapes to bytes; `None` for a broken escape or non-UTF-8 result.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text.get(index + 1..index + 3)?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

fn default_log_level() -> String {
    "info".into()
}
fn default_sampler_ratio() -> f64 {
    1.0
}
