//! A TCP proxy a test can cut, blackhole and restore, to simulate a dependency outage
//! without stopping the shared PostgreSQL or Redis that parallel tests use.
//!
//! - [`TcpProxy::cut`] resets: every open connection is dropped, new ones are refused.
//! - [`TcpProxy::blackhole`] makes packets vanish: open connections stay open but carry
//!   nothing, new ones are accepted and hang. What was in flight is held, and delivered
//!   once [`TcpProxy::restore`] heals the network (as TCP retransmission would).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::helpers::{postgres_host, postgres_port, spawn_app_with, TestApp, TestOptions};

/// A migrated server whose PostgreSQL connections all go through a proxy the test can
/// cut, blackhole and restore; `env` adds or overrides settings.
pub async fn spawn_app_behind_postgres_proxy(env: Vec<(&str, &str)>) -> (TcpProxy, TestApp) {
    let target: SocketAddr = format!("{}:{}", postgres_host(), postgres_port()).parse().unwrap();
    let proxy = TcpProxy::start(target).await;
    let mut env: Vec<(String, String)> =
        env.into_iter().map(|(key, value)| (key.to_string(), value.to_string())).collect();
    env.insert(0, ("POSTGRES_PORT".to_string(), proxy.address.port().to_string()));
    let app = spawn_app_with(TestOptions { env, ..TestOptions::default() }).await;
    (proxy, app)
}

pub struct TcpProxy {
    pub address: SocketAddr,
    open: Arc<AtomicBool>,
    /// True while packets vanish.
    blackholed: watch::Sender<bool>,
    accepted: Arc<AtomicUsize>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept_task: JoinHandle<()>,
}

/// Waits while the network is blackholed.
async fn wait_healed(blackholed: &mut watch::Receiver<bool>) {
    blackholed.wait_for(|blackholed| !blackholed).await.ok();
}

/// Copies one direction, holding whatever arrives while the network is blackholed.
async fn forward(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut blackholed: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        wait_healed(&mut blackholed).await;
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => {
                to.shutdown().await.ok();
                return;
            }
            Ok(read) => read,
        };
        wait_healed(&mut blackholed).await;
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

impl TcpProxy {
    /// Listens on a free local port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let (blackholed, _) = watch::channel(false);
        let accepted = Arc::new(AtomicUsize::new(0));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept_task = tokio::spawn({
            let open = open.clone();
            let blackholed = blackholed.clone();
            let accepted = accepted.clone();
            let connections = connections.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        drop(client); // refused: closed at once
                        continue;
                    }
                    client.set_nodelay(true).ok();
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let mut healed = blackholed.subscribe();
                    let forward_task = tokio::spawn(async move {
                        // A connection opened into a blackhole hangs until it heals.
                        wait_healed(&mut healed).await;
                        let Ok(upstream) = TcpStream::connect(target).await else { return };
                        upstream.set_nodelay(true).ok();
                        let (client_read, client_write) = client.into_split();
                        let (upstream_read, upstream_write) = upstream.into_split();
                        tokio::join!(
                            forward(client_read, upstream_write, healed.clone()),
                            forward(upstream_read, client_write, healed),
                        );
                    });
                    connections.lock().unwrap().push(forward_task);
                }
            }
        });
        Self { address, open, blackholed, accepted, connections, accept_task }
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// Packets vanish: connections stay open and carry nothing until [`Self::restore`].
    pub fn blackhole(&self) {
        self.blackholed.send_replace(true);
    }

    /// Accepts connections again and delivers what a blackhole held.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.blackholed.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept_task.abort();
    }
}
