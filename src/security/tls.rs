//! mTLS on the gRPC port with rustls. The server certificate chain, its key and the
//! client CA bundle are files (a mounted Kubernetes Secret, e.g. cert-manager's
//! `tls.crt`, `tls.key`, `ca.crt`). A polling task re-reads them every
//! TLS_RELOAD_INTERVAL_SECONDS and swaps in a new rustls configuration when their bytes
//! change, so rotation needs no restart: established connections keep their session,
//! new handshakes see the new certificate and CA. Polling the contents (not inotify)
//! also catches Kubernetes' atomic `..data` symlink swap.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use futures::Stream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::metrics;

/// Accepted connections waiting for tonic to pick them up.
const ACCEPTED_QUEUE_LENGTH: usize = 128;

/// Where the mounted certificate files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM chain of the server certificate (leaf first).
    pub certificate_chain: PathBuf,
    /// PEM private key of the server certificate.
    pub private_key: PathBuf,
    /// PEM bundle of the CAs whose client certificates are accepted.
    pub client_ca: PathBuf,
}

/// The raw bytes of the three files, compared to detect a rotation.
#[derive(Clone, PartialEq, Eq)]
struct FileContents {
    certificate_chain: Vec<u8>,
    private_key: Vec<u8>,
    client_ca: Vec<u8>,
}

impl FileContents {
    fn read(files: &TlsFiles) -> anyhow::Result<Self> {
        let read = |path: &Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
        Ok(Self {
            certificate_chain: read(&files.certificate_chain)?,
            private_key: read(&files.private_key)?,
            client_ca: read(&files.client_ca)?,
        })
    }
}

/// Builds a rustls server configuration: TLS 1.2 and 1.3 only (rustls' safe cipher
/// suites), ALPN h2, and a client certificate signed by one of the CAs required.
fn server_config(contents: &FileContents) -> anyhow::Result<ServerConfig> {
    let chain = CertificateDer::pem_slice_iter(&contents.certificate_chain)
        .collect::<Result<Vec<_>, _>>()
        .context("TLS_CERT_FILE: not a PEM certificate chain")?;
    anyhow::ensure!(!chain.is_empty(), "TLS_CERT_FILE: no certificate found");
    let key = PrivateKeyDer::from_pem_slice(&contents.private_key)
        .context("TLS_KEY_FILE: not a PEM private key")?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&contents.client_ca) {
        roots
            .add(ca.context("TLS_CLIENT_CA_FILE: not a PEM certificate bundle")?)
            .context("TLS_CLIENT_CA_FILE: unusable CA certificate")?;
    }
    anyhow::ensure!(!roots.is_empty(), "TLS_CLIENT_CA_FILE: no CA certificate found");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("TLS_CLIENT_CA_FILE: building the client certificate verifier")?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("choosing TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("TLS_CERT_FILE/TLS_KEY_FILE: the key does not match the certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The current rustls configuration, replaced when the files change.
#[derive(Clone)]
pub(crate) struct ReloadingTlsConfig {
    files: TlsFiles,
    current: Arc<ArcSwap<ServerConfig>>,
    /// The file contents `current` was built from.
    loaded: Arc<FileContents>,
}

impl ReloadingTlsConfig {
    /// Loads the files once; a start-up error names the variable at fault.
    pub(crate) fn load(files: TlsFiles) -> anyhow::Result<Self> {
        let contents = FileContents::read(&files)?;
        let config = server_config(&contents)?;
        Ok(Self { files, current: Arc::new(ArcSwap::from_pointee(config)), loaded: Arc::new(contents) })
    }

    /// Polls the files every `interval` and swaps in a new configuration when their
    /// contents change. A half-written or invalid set keeps the previous one (warned).
    pub(crate) async fn watch(self, interval: Duration) {
        let mut last_seen = Some(self.loaded.as_ref().clone());
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let contents = match FileContents::read(&self.files) {
                Ok(contents) => contents,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "tls files unreadable, keeping the current certificates"
                    );
                    continue;
                }
            };
            if last_seen.as_ref() == Some(&contents) {
                continue;
            }
            match server_config(&contents) {
                Ok(config) => {
                    self.current.store(Arc::new(config));
                    metrics::record_tls_reload(true);
                    tracing::info!(certificate = %self.files.certificate_chain.display(), "tls certificates reloaded");
                    last_seen = Some(contents);
                }
                Err(error) => {
                    metrics::record_tls_reload(false);
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "tls files changed but are invalid, keeping the current certificates"
                    );
                }
            }
        }
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }
}

/// Bounds on connections still in their TLS handshake.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HandshakeLimits {
    /// GRPC_HANDSHAKE_TIMEOUT_SECONDS: longest time a client may take to complete it.
    pub timeout: Duration,
    /// GRPC_MAX_PENDING_TLS_HANDSHAKES: connections beyond this many in their handshake
    /// are closed at once.
    pub max_pending: usize,
}

/// Accepts TCP connections and completes each TLS handshake on its own task (a slow
/// client never blocks the others); yields only connections whose handshake succeeded.
/// Failed handshakes (no client certificate, unknown CA, expired) are logged and counted.
/// At most `limits.max_pending` handshakes wait at once: a connection beyond that is
/// closed on accept (counted as `handshake_backlog`), so silent clients cannot pile up.
pub(crate) fn tls_incoming(
    listener: TcpListener,
    tls: ReloadingTlsConfig,
    limits: HandshakeLimits,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(ACCEPTED_QUEUE_LENGTH);
    let pending_handshakes = Arc::new(tokio::sync::Semaphore::new(limits.max_pending));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = sender.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %error, "accepting a tcp connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(handshake_slot) = pending_handshakes.clone().try_acquire_owned() else {
                metrics::record_connection_closed_early("handshake_backlog");
                tracing::debug!(peer = %peer, max_pending = limits.max_pending, "too many pending tls handshakes, closing");
                drop(stream);
                continue;
            };
            // As on the plaintext port: without TCP_NODELAY small responses wait for the
            // peer's delayed ACK (about 40 ms).
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(peer = %peer, error = %error, "setting tcp_nodelay failed");
            }
            let acceptor = tls.acceptor();
            let sender = sender.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(limits.timeout, acceptor.accept(stream)).await;
                drop(handshake_slot);
                match handshake {
                    Ok(Ok(tls_stream)) => {
                        metrics::record_tls_handshake(true);
                        sender.send(Ok(tls_stream)).await.ok();
                    }
                    Ok(Err(error)) => {
                        metrics::record_tls_handshake(false);
                        tracing::info!(peer = %peer, error = %error, "tls handshake refused");
                    }
                    Err(_) => {
                        metrics::record_tls_handshake(false);
                        tracing::info!(peer = %peer, "tls handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unparseable_files_are_refused_naming_the_variable() {
        let contents = FileContents {
            certificate_chain: b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
                .to_vec(),
            private_key: Vec::new(),
            client_ca: Vec::new(),
        };
        let error = server_config(&contents).unwrap_err();
        assert!(format!("{error:#}").contains("TLS_CERT_FILE"), "{error:#}");
        let empty =
            FileContents { certificate_chain: Vec::new(), private_key: Vec::new(), client_ca: Vec::new() };
        assert!(format!("{:#}", server_config(&empty).unwrap_err()).contains("TLS_CERT_FILE"));
    }
}
