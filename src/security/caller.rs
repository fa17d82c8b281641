//! Who is calling: the identity of a call's caller, derived once per call from its
//! connection. Under mTLS it is the identity of the verified client certificate
//! (SPIFFE URI SAN, else DNS SAN); in plaintext mode the peer IP address. The gRPC
//! middleware stores it in the request extensions; authorization, the spans and the
//! idempotency scope of insert_ids read it from there.

use rustls::pki_types::CertificateDer;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// Identity of a TLS client whose certificate carries no SAN we understand.
pub(crate) const UNIDENTIFIED_CALLER: &str = "unidentified";
/// Identity of a plaintext caller whose address is not known.
const UNKNOWN_CALLER: &str = "unknown";

/// The caller of one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CallerIdentity {
    name: String,
    /// Whether `name` comes from a verified client certificate (mTLS).
    verified: bool,
}

impl CallerIdentity {
    /// Derives the identity from a request's connection info (parses the client
    /// certificate under mTLS).
    pub(crate) fn from_connection(extensions: &http::Extensions) -> Self {
        if let Some(tls) = extensions.get::<TlsConnectInfo<TcpConnectInfo>>() {
            let name = tls
                .peer_certs()
                .and_then(|certificates| certificates.first().and_then(certificate_identity))
                .unwrap_or_else(|| UNIDENTIFIED_CALLER.to_string());
            return Self { name, verified: true };
        }
        let name = extensions
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .map_or_else(|| UNKNOWN_CALLER.to_string(), |address| address.ip().to_string());
        Self { name, verified: false }
    }

    /// The identity the middleware stored for this call, or derived from the connection
    /// when none was stored (a service served without the middleware).
    pub(crate) fn of(extensions: &http::Extensions) -> Self {
        extensions.get::<CallerIdentity>().cloned().unwrap_or_else(|| Self::from_connection(extensions))
    }

    /// The caller's name: certificate identity under mTLS, else the peer IP address.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The idempotency scope of the caller's insert_ids: the certificate identity under
    /// mTLS, empty in plaintext mode (where a peer address says nothing lasting).
    pub(crate) fn key_scope(&self) -> &str {
        if self.verified {
            &self.name
        } else {
            ""
        }
    }
}

/// The caller identity of a verified client certificate: its first SPIFFE URI SAN,
/// else its first DNS SAN. `None` when the certificate carries neither.
pub(crate) fn certificate_identity(certificate: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let names = parsed.subject_alternative_name().ok()??.value.general_names.clone();
    let spiffe = names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
            Some(uri.to_string())
        }
        _ => None,
    });
    spiffe.or_else(|| {
        names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
            _ => None,
        })
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    #[test]
    fn a_plaintext_caller_is_its_peer_address_with_no_key_scope() {
        let mut extensions = http::Extensions::new();
        let caller = CallerIdentity::from_connection(&extensions);
        assert_eq!((caller.name(), caller.key_scope()), ("unknown", ""));
        let peer: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        extensions.insert(TcpConnectInfo { local_addr: None, remote_addr: Some(peer) });
        let caller = CallerIdentity::from_connection(&extensions);
        assert_eq!((caller.name(), caller.key_scope()), ("10.1.2.3", ""));
    }

    #[test]
    fn the_stored_identity_wins_over_the_connection() {
        let mut extensions = http::Extensions::new();
        let stored = CallerIdentity { name: "spiffe://prod/gateway".into(), verified: true };
        extensions.insert(stored.clone());
        assert_eq!(CallerIdentity::of(&extensions), stored);
        assert_eq!(stored.key_scope(), "spiffe://prod/gateway");
    }
}
