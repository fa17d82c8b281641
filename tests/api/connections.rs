//! Idle and half-open connections: a connection that never sends the HTTP/2 preface (in
//! plaintext, or after a completed TLS handshake) is closed after
//! GRPC_HANDSHAKE_TIMEOUT_SECONDS; one that started HTTP/2 but answers no PING is closed
//! by the keepalive; connections beyond GRPC_MAX_PENDING_TLS_HANDSHAKES still in their
//! handshake are closed at once. "Closed" is a read returning EOF (or a reset); the
//! outer wait is far longer than the configured limits and only stops a hung test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use prost::Message as _;

use crate::certs::{CertDir, Leaf, TestCa};
use crate::helpers::{metric_value, spawn_app_with, track_request, TestApp, TestOptions};
use crate::malformed::{frame, RawClient, TRACK_EVENT};

/// Longest a test waits for the server to close a connection it should close.
const HUNG: Duration = Duration::from_secs(60);
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
}

/// Reads (and discards what the server sends) until the server closes the connection.
/// Panics when it is still open after [`HUNG`].
async fn wait_closed(mut connection: impl AsyncRead + Unpin, what: &str) {
    let mut buffer = [0u8; 4096];
    let closed = tokio::time::timeout(HUNG, async {
        loop {
            match connection.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: the server kept the connection open");
}

async fn closed_early(app: &TestApp, reason: &str) -> f64 {
    let (_, metrics) = app.admin_get("/metrics").await;
    metric_value(&metrics, &format!("analytics_grpc_connections_closed_early_total{{reason=\"{reason}\"}}"))
}

#[tokio::test]
async fn silent_plaintext_connections_are_closed_and_others_keep_working() {
    let app = spawn_app_with(TestOptions {
        env: env(&[("GRPC_HANDSHAKE_TIMEOUT_SECONDS", "1")]),
        ..TestOptions::default()
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(app.grpc_address).await.unwrap());
    }
    // Half a preface does not count as one.
    let mut partial = TcpStream::connect(app.grpc_address).await.unwrap();
    partial.write_all(&HTTP2_PREFACE[..10]).await.unwrap();
    silent.push(partial);

    futures::future::join_all(silent.into_iter().map(|connection| wait_closed(connection, "silent"))).await;
    assert_eq!(closed_early(&app, "no_preface").await, 21.0);
    app.client
        .clone()
        .track_event(track_request("after_silence", "u1"))
        .await
        .expect("real clients are served");
}

#[tokio::test]
async fn a_peer_that_answers_no_keepalive_ping_is_closed() {
    let app = spawn_app_with(TestOptions {
        env: env(&[("GRPC_KEEPALIVE_INTERVAL_SECONDS", "1"), ("GRPC_KEEPALIVE_TIMEOUT_SECONDS", "1")]),
        ..TestOptions::default()
    })
    .await;
    // Starts HTTP/2 properly, then goes silent: no SETTINGS ack, no PING ack (a peer
    // that vanished, or a half-open connection).
    let mut half_open = TcpStream::connect(app.grpc_address).await.unwrap();
    half_open.write_all(HTTP2_PREFACE).await.unwrap();
    half_open.write_all(EMPTY_SETTINGS).await.unwrap();
    wait_closed(half_open, "no ping ack").await;
    assert_eq!(
        closed_early(&app, "no_preface").await,
        0.0,
        "closed by the keepalive, not the preface deadline"
    );

    // A client that answers the pings keeps its connection through idle periods (the raw
    // HTTP/2 client never reconnects, so its call proves the same connection is open).
    let client = RawClient::connect(app.grpc_address).await;
    let body = frame(&track_request("after_idle", "u1").encode_to_vec());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let answer = client.call(TRACK_EVENT, Some("application/grpc"), body).await;
    assert_eq!(answer.code, Some(tonic::Code::Ok), "{answer:?}");
}

/// rustls client configuration presenting `client`, trusting `server_ca_pem`.
fn tls_client_config(server_ca_pem: &str, client: &Leaf) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(server_ca_pem.as_bytes()) {
        roots.add(certificate.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(client.certificate_pem.as_bytes()).map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

struct TlsServer {
    app: TestApp,
    server_ca: TestCa,
    client_ca: TestCa,
    _dir: CertDir,
}

async fn spawn_tls(extra: &[(&str, &str)]) -> TlsServer {
    let server_ca = TestCa::new("server ca");
    let client_ca = TestCa::new("client ca");
    let dir = CertDir::new();
    dir.write_server(&server_ca.server("server"), &client_ca.pem());
    let mut variables = dir.server_env();
    variables.extend(env(extra));
    let app = spawn_app_with(TestOptions { env: variables, ..TestOptions::default() }).await;
    TlsServer { app, server_ca, client_ca, _dir: dir }
}

async fn tls_handshake(
    address: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(address).await?;
    tokio_rustls::TlsConnector::from(config).connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

#[tokio::test]
async fn silent_connections_are_closed_before_and_after_the_tls_handshake() {
    let server = spawn_tls(&[("GRPC_HANDSHAKE_TIMEOUT_SECONDS", "1")]).await;
    let config =
        tls_client_config(&server.server_ca.pem(), &server.client_ca.client("spiffe://t/a", "a.test"));

    let mut no_hello = Vec::new();
    for _ in 0..5 {
        no_hello.push(TcpStream::connect(server.app.grpc_address).await.unwrap());
    }
    let mut after_handshake = Vec::new();
    for _ in 0..5 {
        after_handshake
            .push(tls_handshake(server.app.grpc_address, config.clone()).await.expect("handshake"));
    }
    futures::future::join_all(
        no_hello.into_iter().map(|connection| wait_closed(connection, "no client hello")),
    )
    .await;
    futures::future::join_all(
        after_handshake.into_iter().map(|connection| wait_closed(connection, "silent after tls")),
    )
    .await;
    assert_eq!(closed_early(&server.app, "no_preface").await, 5.0, "the five that finished tls");
}

#[tokio::test]
async fn handshakes_beyond_the_bound_are_refused_at_once() {
    let server =
        spawn_tls(&[("GRPC_MAX_PENDING_TLS_HANDSHAKES", "2"), ("GRPC_HANDSHAKE_TIMEOUT_SECONDS", "60")])
            .await;
    let address = server.app.grpc_address;
    let pending_first = TcpStream::connect(address).await.unwrap();
    let pending_second = TcpStream::connect(address).await.unwrap();
    // The accept loop takes connections in order: both slots are held before the third.
    let wait_accepted = async {
        while closed_early(&server.app, "handshake_backlog").await == 0.0 {
            let third = TcpStream::connect(address).await.unwrap();
            wait_closed(third, "third pending handshake").await;
        }
    };
    tokio::time::timeout(HUNG, wait_accepted).await.expect("a handshake beyond the bound is refused");
    for pending in [&pending_first, &pending_second] {
        let mut probe = [0u8; 1];
        let still_open = matches!(pending.try_read(&mut probe), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock);
        assert!(still_open, "the two handshakes within the bound are still waiting");
    }
    drop((pending_first, pending_second));

    // With the slots free again a real client gets in.
    let config =
        tls_client_config(&server.server_ca.pem(), &server.client_ca.client("spiffe://t/a", "a.test"));
    let mut connected = None;
    for _ in 0..100 {
        if let Ok(stream) = tls_handshake(address, config.clone()).await {
            connected = Some(stream);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(connected.is_some(), "handshakes succeed once the pending ones are gone");
}
