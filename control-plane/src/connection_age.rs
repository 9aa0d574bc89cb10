//! The maximum connection age of the xDS port: each connection is told to go
//! (HTTP/2 GOAWAY) after its age — the configured maximum ±10 % jitter,
//! picked per connection so connections made together do not leave
//! together — and is closed after a further grace if its streams are still
//! open. Clients then reconnect and spread over the replicas that exist now
//! (after a replica restarted, its clients would otherwise stay on the
//! survivors for good).
//!
//! tonic's own `max_connection_age` has neither jitter nor a working grace
//! (0.14: with a grace set it closes the connection without a GOAWAY; without
//! one it waits for ADS streams, which never end). So each connection gets a
//! server of its own whose shutdown signal is the connection's age (tonic
//! then sends the GOAWAY and drains), over an [`Aged`] transport that fails
//! at age + grace. The connection's TLS and address information is passed
//! through unchanged (`remote_addr`, peer certificates).
//!
//! A client that reconnects keeps what it holds until the new stream answers,
//! and a replica answers no stream before its first Cloud Map sync, so a
//! reconnect never shows a client an empty state.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, Router};

/// How long connections may live.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionAge {
    /// The age before jitter.
    pub max: Duration,
    /// How long streams may stay open after the GOAWAY.
    pub grace: Duration,
}

/// ±10 %.
const JITTER: f64 = 0.1;

impl ConnectionAge {
    /// This connection's age: `max` ±10 %.
    pub fn pick(&self) -> Duration {
        self.max.mul_f64(rand::rng().random_range(1.0 - JITTER..=1.0 + JITTER))
    }
}

/// A connection whose reads and writes fail from `deadline` on: hyper then
/// closes it, which ends the streams a GOAWAY did not.
#[derive(Debug)]
pub struct Aged<T> {
    inner: T,
    deadline: Pin<Box<Sleep>>,
    expired: bool,
}

impl<T> Aged<T> {
    pub fn new(inner: T, lifetime: Duration) -> Self {
        Aged { inner, deadline: Box::pin(tokio::time::sleep(lifetime)), expired: false }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if !self.expired && self.deadline.as_mut().poll(cx).is_ready() {
            self.expired = true;
        }
        if self.expired {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "maximum connection age and grace reached",
            ));
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Aged<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        // hyper keeps a read pending on every HTTP/2 connection, so polling
        // the deadline here arms its timer.
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Aged<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Aged<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The connections `listener` accepts, each with `TCP_NODELAY` set (see
/// [`no_delay`]).
pub fn accepted(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| accepted.inspect(no_delay))
}

/// Turn Nagle's algorithm off on an accepted connection, as gRPC servers do:
/// with it on, a push written while an earlier segment awaits the client's
/// TCP ACK waits for that ACK, and the client delays its ACKs by up to 40 ms.
/// tonic sets it only on connections it accepts itself.
pub fn no_delay(tcp: &tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY not set: {e}");
    }
}

/// Serve `router` on every connection `incoming` yields, each with its own
/// age (see the module doc), until `stopped` resolves; then every
/// connection gets its GOAWAY at once.
pub async fn serve<I, IO, E, S, F>(router: Router, incoming: I, age: ConnectionAge, stopped: S)
where
    I: futures::Stream<Item = Result<IO, E>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    E: std::fmt::Display,
    S: Fn() -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut incoming = std::pin::pin!(incoming);
    let mut stop = std::pin::pin!(stopped());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let io = tokio::select! {
            io = incoming.next() => io,
            Some(_) = connections.join_next() => continue,
            () = &mut stop => break,
        };
        let io = match io {
            Some(Ok(io)) => io,
            Some(Err(e)) => {
                tracing::debug!("accept failed: {e}");
                continue;
            }
            None => break,
        };
        let lifetime = age.pick();
        let aged = Aged::new(io, lifetime + age.grace);
        // One connection, then nothing: a stream that ended would shut this server down.
        let one = futures::stream::once(async move { Ok::<_, std::io::Error>(aged) }).chain(futures::stream::pending());
        let global = stopped();
        let goaway = async move {
            tokio::select! {
                () = tokio::time::sleep(lifetime) => {
                    tracing::debug!(?lifetime, "connection reached its maximum age; GOAWAY");
                }
                () = global => {}
            }
        };
        let router = router.clone();
        connections.spawn(async move {
            if let Err(e) = router.serve_with_incoming_shutdown(one, goaway).await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    // Shutting down: every connection has its GOAWAY; wait for them to drain
    // (the caller bounds the wait).
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_jitter_within_ten_percent_and_differ() {
        let age = ConnectionAge { max: Duration::from_secs(100), grace: Duration::from_secs(5) };
        let picks: Vec<Duration> = (0..200).map(|_| age.pick()).collect();
        assert!(picks.iter().all(|d| *d >= Duration::from_secs(90) && *d <= Duration::from_secs(110)));
        let spread = picks.iter().max().copied().unwrap_or_default() - picks.iter().min().copied().unwrap_or_default();
        assert!(spread > Duration::from_secs(10), "jitter spreads the ages: {spread:?}");
    }

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = std::pin::pin!(accepted(listener));
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let server = incoming.next().await.expect("a connection").expect("accepted");
        assert!(server.nodelay().expect("readable option"), "TCP_NODELAY set on the accepted side");
    }

    #[tokio::test(start_paused = true)]
    async fn an_aged_connection_fails_at_its_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(64);
        let mut aged = Aged::new(a, Duration::from_secs(2));
        b.write_all(b"hi").await.unwrap_or_default();
        let mut buf = [0u8; 2];
        assert!(aged.read_exact(&mut buf).await.is_ok(), "alive before the deadline");
        let read = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            aged.read(&mut buf).await
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        let result = read.await.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string()));
        assert!(result.is_err_and(|e| e.contains("maximum connection age")));
    }
}
