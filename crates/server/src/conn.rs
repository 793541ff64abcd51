//! Accepting connections on a listener: TCP options, the TLS handshake, and the limits every
//! listener keeps whatever its clients do.
//!
//! Each accepted socket gets its own task for the handshake, bounded by [`HANDSHAKE_TIMEOUT`],
//! so a client that connects and sends nothing (or a byte a minute) holds one task and one
//! connection slot for that long, never the accept loop. After the handshake the protocol must
//! start within [`FIRST_BYTES_TIMEOUT`] (the HTTP/2 preface, an HTTP/1 request line): a client
//! that sends nothing is closed. From then on the protocols keep the time: HTTP/2 keepalive
//! pings and a call timeout on the gRPC and peer ports, a header-read timeout on the HTTP port
//! (see `api.rs` and `http.rs`). A listener holds at most [`MAX_CONNECTIONS`]; past that, new
//! sockets are closed at once until one ends. What comes out
//! is a stream of [`Conn`]s that tonic and axum serve, each carrying a [`ConnInfo`] for the
//! request extensions: the remote address, which listener, and the verified certificate's
//! [`Identity`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use vow_client::tls::{MaybeTls, Reloading};

use crate::tls::Identity;

/// Connections one listener holds at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after accepting (and the TLS handshake) a client may wait before its first bytes.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The public gRPC API.
    Grpc,
    /// The HTTP port: probes, metrics, the gateway.
    Http,
    /// Raft and routing between nodes.
    Peer,
}

/// What the server knows about a connection, in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    pub listener: Listener,
    /// The identity of a verified client certificate, if the client presented one.
    pub identity: Option<Arc<Identity>>,
}

/// An accepted connection, plain or TLS, holding its listener slot until it is dropped.
#[derive(Debug)]
pub struct Conn {
    io: MaybeTls,
    info: ConnInfo,
    /// Runs until the client's first bytes arrive; reads fail with `TimedOut` once it fires.
    first_bytes: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }
}

/// Accepts connections on `listener` until the returned receiver is dropped: TCP_NODELAY set,
/// the TLS handshake made when `tls` is given.
pub fn accept(
    listener: TcpListener,
    kind: Listener,
    tls: Option<Arc<Reloading<rustls::ServerConfig>>>,
) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, kind, tls, tx));
    rx
}

async fn accept_loop(
    listener: TcpListener,
    kind: Listener,
    tls: Option<Arc<Reloading<rustls::ServerConfig>>>,
    tx: mpsc::Sender<Conn>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tx.closed() => return,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted: the
                // listener itself is fine. A short pause keeps an EMFILE from spinning.
                tracing::debug!(listener = ?kind, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await; // back off before accepting again
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(listener = ?kind, %remote, limit = MAX_CONNECTIONS, "connection limit reached; closing a new connection");
            continue;
        };
        // Without it, Nagle's algorithm and delayed ACKs add ~40 ms to small replies.
        let _ = tcp.set_nodelay(true);
        let tx = tx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let (io, identity) = match tls {
                None => (MaybeTls::Plain(tcp), None),
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config.get());
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let io = MaybeTls::Tls(Box::new(tokio_rustls::TlsStream::Server(stream)));
                            let identity =
                                io.peer_certificates().and_then(|c| c.first()).map(|leaf| Arc::new(Identity::of(leaf)));
                            (io, identity)
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(listener = ?kind, %remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(listener = ?kind, %remote, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let conn = Conn {
                io,
                info: ConnInfo { remote: Some(remote), listener: kind, identity },
                first_bytes: Some(Box::pin(tokio::time::sleep(FIRST_BYTES_TIMEOUT))),
                _slot: slot,
            };
            let _ = tx.send(conn).await;
        });
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Some(deadline) = self.first_bytes.as_mut() {
            match &read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => self.first_bytes = None,
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    tracing::debug!(listener = ?self.info.listener, remote = ?self.info.remote, "no bytes from the client in time; closing");
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client sent nothing after connecting",
                    )));
                }
                _ => {}
            }
        }
        read
    }
}

/// Writes are never vectored. h2 then copies DATA payloads of up to 1 KiB into its write buffer
/// instead of chaining every payload over 256 bytes, and a unary reply — headers, a message of a
/// few hundred bytes, trailers — leaves in one write. With chaining the trailers could not be
/// buffered behind the chained payload and went out in a second write (and a second read and
/// wake-up at the client) for every reply with a 256-byte value; larger payloads are still
/// chained.
impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// The accepted connections as a stream tonic serves.
pub fn incoming(rx: mpsc::Receiver<Conn>) -> impl futures::Stream<Item = std::io::Result<Conn>> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) })
}
