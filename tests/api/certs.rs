//! Test certificates made with rcgen: CAs, server certificates for 127.0.0.1/localhost
//! and client certificates with a SPIFFE URI SAN and a DNS SAN, written as the files
//! Kubernetes mounts from a cert-manager Secret (`tls.crt`, `tls.key`, `ca.crt`).

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// A CA that signs server and client certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate with its key, in PEM.
pub struct Leaf {
    pub certificate_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self, common_name: &str) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A server certificate for exactly `names` (DNS names or IP addresses).
    pub fn server_for(&self, names: &[&str]) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|name| name.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate with a SPIFFE URI SAN (the caller identity) and a DNS SAN.
    pub fn client(&self, spiffe_id: &str, dns_name: &str) -> Leaf {
        self.client_valid_between(
            spiffe_id,
            dns_name,
            OffsetDateTime::now_utc() - Duration::hours(1),
            OffsetDateTime::now_utc() + Duration::days(1),
        )
    }

    /// A client certificate that expired yesterday.
    pub fn expired_client(&self, spiffe_id: &str) -> Leaf {
        self.client_valid_between(
            spiffe_id,
            "expired.test",
            OffsetDateTime::now_utc() - Duration::days(10),
            OffsetDateTime::now_utc() - Duration::days(1),
        )
    }

    /// A client certificate with only a DNS SAN.
    pub fn dns_only_client(&self, dns_name: &str) -> Leaf {
        let mut params = CertificateParams::new(vec![dns_name.to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn client_valid_between(
        &self,
        spiffe_id: &str,
        dns_name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Leaf {
        let mut params = CertificateParams::new(vec![dns_name.to_string()]).unwrap();
        params.subject_alt_names.insert(0, SanType::URI(spiffe_id.try_into().unwrap()));
        params.distinguished_name.push(DnType::CommonName, dns_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { certificate_pem: certificate.pem(), key_pem: key.serialize_pem() }
    }
}

/// A directory of certificate files that lives as long as the test.
pub struct CertDir {
    pub path: PathBuf,
}

impl CertDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("analytics-tls-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&path).unwrap();
        Self { path }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a file atomically (write then rename), as a Secret update appears.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let target = self.file(name);
        let staging = self.file(&format!(".{name}.tmp"));
        std::fs::write(&staging, contents).unwrap();
        std::fs::rename(&staging, &target).unwrap();
        target
    }

    /// Writes the server files (`tls.crt`, `tls.key`, `ca.crt`).
    pub fn write_server(&self, server: &Leaf, client_ca_pem: &str) {
        self.write("tls.crt", &server.certificate_pem);
        self.write("tls.key", &server.key_pem);
        self.write("ca.crt", client_ca_pem);
    }

    /// Writes a client's files and returns (certificate, key) paths.
    pub fn write_client(&self, name: &str, client: &Leaf) -> (PathBuf, PathBuf) {
        (
            self.write(&format!("{name}.crt"), &client.certificate_pem),
            self.write(&format!("{name}.key"), &client.key_pem),
        )
    }

    /// The server's environment: the three TLS variables and a 1 s reload interval.
    pub fn server_env(&self) -> Vec<(String, String)> {
        let path = |name: &str| self.file(name).display().to_string();
        vec![
            ("TLS_CERT_FILE".into(), path("tls.crt")),
            ("TLS_KEY_FILE".into(), path("tls.key")),
            ("TLS_CLIENT_CA_FILE".into(), path("ca.crt")),
            ("TLS_RELOAD_INTERVAL_SECONDS".into(), "1".into()),
        ]
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.path).ok();
    }
}
