//! Value types and helpers shared by the configuration sections: [`Secret`], named
//! parsing of enum-like variables, optional paths and CA bundles.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use super::ConfigError;

/// A value that never prints (passwords). `Debug` and logs show `***`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is handed to a driver.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

/// Parses an enum-like variable, naming it in the error (envy's own messages for
/// enums do not).
pub(super) fn parse_named<'de, D, T>(deserializer: D, variable: &str) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    let raw = String::deserialize(deserializer)?;
    raw.trim().parse().map_err(|reason| D::Error::custom(format!("{variable}: {reason}")))
}

/// A path variable; empty (or white space) means unset.
pub(super) fn non_empty_path(raw: &str) -> Option<PathBuf> {
    let trimmed = raw.trim();
    (!trimmed.is_empty()).then(|| PathBuf::from(trimmed))
}

/// Reads a PEM CA bundle; it must hold at least one certificate. The error names `variable`.
pub fn read_ca_bundle(variable: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|error| ConfigError(format!("{variable}: cannot read {}: {error}", path.display())))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN CERTIFICATE-----") {
        return Err(ConfigError(format!("{variable}: {} holds no PEM certificate", path.display())));
    }
    Ok(bytes)
}

/// Fails with "`variable`: must be between `low` and `high`" when `value` is outside.
pub(super) fn check_range<T: PartialOrd + fmt::Display>(
    variable: &str,
    value: T,
    low: T,
    high: T,
) -> Result<(), ConfigError> {
    if value < low || value > high {
        return Err(ConfigError::variable(variable, format!("must be between {low} and {high}")));
    }
    Ok(())
}
