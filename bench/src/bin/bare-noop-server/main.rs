//! `bare-noop-server`: the transport baseline of `loadgen`. A tonic server with tonic's
//! defaults only (no middleware, no TLS, no metrics) serving grpc.health.v1 `Check`, whose
//! answer for the service "" is always SERVING. loadgen spawns it as its own process, like
//! the service, and drives it with the same client and concurrency.
//!
//! ```sh
//! target/release/bare-noop-server 127.0.0.1:50061
//! ```

use std::net::SocketAddr;

use anyhow::Context as _;
use tonic::transport::Server;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let address: SocketAddr = std::env::args()
        .nth(1)
        .context("usage: bare-noop-server ADDRESS:PORT")?
        .parse()
        .context("ADDRESS:PORT, e.g. 127.0.0.1:50061")?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    Server::builder().add_service(health).serve(address).await?;
    Ok(())
}
