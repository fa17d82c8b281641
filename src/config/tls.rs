//! The TLS section: the mTLS files of the gRPC port (TLS_CERT_FILE, TLS_KEY_FILE,
//! TLS_CLIENT_CA_FILE), their reload interval, and the caller allow-lists
//! (TLS_ALLOWED_CALLERS*), parsed into a [`CallerPolicy`] at load time.

use std::time::Duration;

use serde::Deserialize;

use super::values::{check_range, non_empty_path};
use super::{read_section, ConfigError, Vars};
use crate::security::authorization::{AdminAccess, CallerPolicy};
use crate::security::tls::TlsFiles;

/// mTLS and who may call what.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// The mTLS files, when all three are set; `None` = plaintext.
    pub files: Option<TlsFiles>,
    /// TLS_RELOAD_INTERVAL_SECONDS: how often the files are checked for a rotation.
    pub reload_interval: Duration,
    /// TLS_ALLOWED_CALLERS and TLS_ALLOWED_CALLERS_PER_RPC; open when both are empty,
    /// except for the administrative RPCs: with mTLS only their per-RPC entries open
    /// them, without mTLS ADMIN_RPCS_ENABLED=true opens them to every caller.
    pub callers: CallerPolicy,
    /// TLS_ALLOWED_CALLERS_COVER_REFLECTION: server reflection answers only callers on
    /// TLS_ALLOWED_CALLERS (true) or every verified caller (false).
    pub callers_cover_reflection: bool,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    tls_cert_file: String,
    #[serde(default)]
    tls_key_file: String,
    #[serde(default)]
    tls_client_ca_file: String,
    #[serde(default = "default_reload_interval_seconds")]
    tls_reload_interval_seconds: u64,
    #[serde(default)]
    tls_allowed_callers: String,
    #[serde(default)]
    tls_allowed_callers_per_rpc: String,
    #[serde(default = "super::default_enabled")]
    tls_allowed_callers_cover_reflection: bool,
    #[serde(default)]
    admin_rpcs_enabled: bool,
}

impl TlsConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let raw: Raw = read_section(vars)?;
        let paths =
            [&raw.tls_cert_file, &raw.tls_key_file, &raw.tls_client_ca_file].map(|raw| non_empty_path(raw));
        let files = match paths {
            [Some(certificate_chain), Some(private_key), Some(client_ca)] => {
                Some(TlsFiles { certificate_chain, private_key, client_ca })
            }
            [None, None, None] => None,
            _ => {
                return Err(ConfigError::variable(
                    "TLS_CERT_FILE/TLS_KEY_FILE/TLS_CLIENT_CA_FILE",
                    "set all three for mTLS, or none for plaintext",
                ))
            }
        };
        check_range("TLS_RELOAD_INTERVAL_SECONDS", raw.tls_reload_interval_seconds, 1, 3_600)?;
        let callers = CallerPolicy::parse(&raw.tls_allowed_callers, &raw.tls_allowed_callers_per_rpc)
            .map_err(ConfigError)?;
        let admin = match (&files, raw.admin_rpcs_enabled) {
            (Some(_), _) => AdminAccess::ListedCallers,
            (None, true) => AdminAccess::Everyone,
            (None, false) => AdminAccess::Nobody,
        };
        let callers = callers.with_admin_access(admin);
        if !callers.is_open() && files.is_none() {
            return Err(ConfigError::variable(
                "TLS_ALLOWED_CALLERS",
                "caller allow-lists need mTLS (TLS_CERT_FILE and friends)",
            ));
        }
        Ok(Self {
            files,
            reload_interval: Duration::from_secs(raw.tls_reload_interval_seconds),
            callers,
            callers_cover_reflection: raw.tls_allowed_callers_cover_reflection,
        })
    }

    /// The policy server reflection follows: the global list, unless configured open.
    pub fn reflection_callers(&self) -> CallerPolicy {
        if self.callers_cover_reflection {
            self.callers.clone()
        } else {
            CallerPolicy::default()
        }
    }
}

fn default_reload_interval_seconds() -> u64 {
    10
}
