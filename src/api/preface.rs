//! The HTTP/2 preface deadline: an accepted connection (after its TLS handshake, when mTLS
//! is on) must send the 24-byte HTTP/2 connection preface within
//! GRPC_HANDSHAKE_TIMEOUT_SECONDS, or it is closed. hyper waits for the preface forever
//! and its keepalive pings only start once the connection is up, so without this a
//! client that connects and stays silent holds a socket and a task indefinitely.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

use crate::metrics;

/// Bytes of the HTTP/2 client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const HTTP2_PREFACE_BYTES: usize = 24;

/// A connection whose reads fail once `timeout` passes before the preface has arrived;
/// hyper then closes it. After the preface it only forwards.
pub(crate) struct PrefaceDeadline<IO> {
    io: IO,
    /// Running until the preface has arrived, `None` afterwards.
    deadline: Option<Pin<Box<Sleep>>>,
    received: usize,
}

impl<IO> PrefaceDeadline<IO> {
    pub(crate) fn new(io: IO, timeout: Duration) -> Self {
        Self { io, deadline: Some(Box::pin(tokio::time::sleep(timeout))), received: 0 }
    }
}

/// Puts every connection of `incoming` under the preface deadline.
pub(crate) fn with_preface_deadline<S, IO>(
    incoming: S,
    timeout: Duration,
) -> impl Stream<Item = Result<PrefaceDeadline<IO>, io::Error>>
where
    S: Stream<Item = Result<IO, io::Error>>,
{
    incoming.map(move |accepted| accepted.map(|io| PrefaceDeadline::new(io, timeout)))
}

impl<IO: AsyncRead + Unpin> AsyncRead for PrefaceDeadline<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let filled_before = buffer.filled().len();
        let result = Pin::new(&mut this.io).poll_read(context, buffer);
        let Some(deadline) = this.deadline.as_mut() else { return result };
        match &result {
            Poll::Ready(Ok(())) => {
                this.received += buffer.filled().len() - filled_before;
                if this.received >= HTTP2_PREFACE_BYTES {
                    this.deadline = None;
                }
                result
            }
            Poll::Ready(Err(_)) => result,
            Poll::Pending => {
                if deadline.as_mut().poll(context).is_ready() {
                    this.deadline = None;
                    metrics::record_connection_closed_early("no_preface");
                    tracing::debug!(received_bytes = this.received, "no http/2 preface in time, closing");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no http/2 preface within the handshake timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for PrefaceDeadline<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(context, bytes)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(context)
    }
}

/// The wrapped connection's own info (peer address, client certificate), so callers are
/// identified as before.
impl<IO: Connected> Connected for PrefaceDeadline<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
