//! The server's Prometheus page, read over a plain HTTP/1.0 request to its admin port.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The whole response (headers and the text exposition) of `GET /metrics` at `admin`.
pub async fn metrics_page(admin: SocketAddr) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(admin).await?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}
