//! One HTTP/2 connection per peer address, shared by every shard's Raft traffic, request
//! routing and joining: to the peer's peer port, under mutual TLS when the node has TLS.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use vow_client::tls::{ClientTls, MaybeTls};

/// How often a peer connection is pinged, and how long the answer may take before it is
/// dropped. A peer cut off without closing the connection (a partition) is noticed within the
/// sum: the calls routed to it fail then, and go to the shard's next leader, instead of each
/// waiting out its caller's deadline (5 s and 5 s made a partition cost every call routed to
/// the cut node up to 5 s). A live node answers a PING from its connection task at once.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// A cache of lazily connected channels. Cloning shares the cache.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    tls: Option<ClientTls>,
}

impl Peers {
    /// Peers reached in plain text, or with `tls` (the node's certificate, the cluster CA).
    pub fn new(tls: Option<ClientTls>) -> Peers {
        Peers { channels: Arc::default(), tls }
    }

    /// The channel to `addr` (`host:port`, a peer port), created on first use. Connection
    /// failures surface on the calls, which is where the callers handle them.
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        // The lock only guards the map lookup; it is never held across an await.
        let mut channels = self.channels.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_EVERY)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_with_connector_lazy(Connector { tls: self.tls.clone() });
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }
}

/// Makes a channel's connections: TCP with TCP_NODELAY, then the TLS handshake when configured,
/// verifying the peer's certificate against the cluster CA for the host dialled.
#[derive(Clone, Debug)]
struct Connector {
    tls: Option<ClientTls>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long the TLS handshake with a peer may take (after the TCP connect).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<MaybeTls>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri.host().ok_or("peer address without a host")?.to_owned();
            let port = uri.port_u16().ok_or("peer address without a port")?;
            let tcp =
                tokio::net::TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)).await?;
            tcp.set_nodelay(true)?;
            let io = match tls {
                Some(tls) => tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.connect(&host, tcp))
                    .await
                    .map_err(|_| "TLS handshake with a peer timed out")??,
                None => MaybeTls::Plain(tcp),
            };
            Ok(TokioIo::new(io))
        })
    }
}
