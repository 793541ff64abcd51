//! The client's gRPC transport: one HTTP/2 connection per endpoint, driven by the `h2` crate.
//!
//! tonic's own `Channel` hands every call to a buffer task, which hands it to hyper's dispatch
//! task, which hands it to the connection: three tasks and their wake-ups per call, and the
//! reply makes the same trip back. Here the calling task opens the stream, queues its request
//! and reads its reply itself; only the connection's task touches the socket. With a client
//! per connection running one call at a time (a function waiting on its promise, or `vow
//! bench`), that is most of the client's CPU per call.
//!
//! [`H2Channel`] is a `tower::Service` over `http` requests, so tonic's generated clients run
//! on it unchanged, for unary calls (every call of vow's API, and etcd's KV calls in `vow
//! bench`): the request body is collected before it is sent, so a client-streaming call would
//! wait for its stream to end. The connection is made on the first call and again on the first call after
//! it broke. Errors are tonic [`Status`]es a caller can act on: `Unavailable` when the request
//! never left (no connection, connection already closed, stream refused), `Unknown` when it may
//! have reached the server (the connection broke while the call was in flight).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme, Uri};
use http_body::{Body, Frame};
use tonic::Status;

use crate::tls::{ClientTls, MaybeTls, Token};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long making a connection (TCP and the HTTP/2 handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an idle connection is checked with an HTTP/2 PING, and how long the answer may
/// take. A peer that vanished without closing the connection (a partition, a host lost) is
/// noticed in at most the sum, and the next call makes a new connection instead of waiting out
/// its deadline on the dead one.
const KEEPALIVE_EVERY: Duration = Duration::from_millis(if cfg!(test) { 1500 } else { 5000 });
const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(if cfg!(test) { 1500 } else { 5000 });
/// While calls wait for their replies the connection is pinged this often, and dropped if a
/// PING goes unanswered for [`BUSY_PING_TIMEOUT`]: its calls then fail as maybe-sent and are
/// retried elsewhere within ~3 s of a partition, instead of each waiting out its attempt
/// timeout (5 s by default) on a peer that is gone. A live node answers a PING from its
/// connection task in well under a millisecond, however long the call itself takes (an Await).
const BUSY_PING_EVERY: Duration = Duration::from_millis(if cfg!(test) { 50 } else { 1000 });
const BUSY_PING_TIMEOUT: Duration = Duration::from_millis(if cfg!(test) { 100 } else { 2000 });

/// A lazily connected HTTP/2 connection to one endpoint. Cheap to clone; clones share the
/// connection.
#[derive(Clone)]
pub struct H2Channel {
    shared: Arc<Shared>,
}

struct Shared {
    addr: String,
    authority: Authority,
    security: Security,
    /// The live connection's handle, if there is one.
    sender: Mutex<Option<h2::client::SendRequest<Bytes>>>,
    /// Serialises connecting, so that calls arriving together make one connection.
    connecting: tokio::sync::Mutex<()>,
    /// Calls sent and waiting for their reply's headers (which a unary reply sends with its
    /// message): while there are any, the keepalive pings more often.
    waiting: Arc<AtomicUsize>,
}

/// Counts a call as waiting for its reply while it lives.
struct Waiting(Arc<AtomicUsize>);

impl Waiting {
    fn new(count: &Arc<AtomicUsize>) -> Waiting {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for H2Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Channel").field("addr", &self.shared.addr).finish()
    }
}

/// How a channel secures its calls: TLS for the connection, a bearer token on every request
/// that does not carry its own `authorization` (a settle with a completion token does).
#[derive(Debug, Clone, Default)]
pub struct Security {
    pub tls: Option<ClientTls>,
    pub token: Option<Token>,
}

impl H2Channel {
    /// A plain-text channel to `addr` (`host:port`); fails only for an address that is not one.
    pub fn new(addr: &str) -> Result<H2Channel, String> {
        Self::with_security(addr, Security::default())
    }

    /// A channel to `addr` secured by `security`.
    pub fn with_security(addr: &str, security: Security) -> Result<H2Channel, String> {
        let authority: Authority = addr.parse().map_err(|e| format!("bad endpoint {addr:?}: {e}"))?;
        if authority.port_u16().is_none() {
            return Err(format!("bad endpoint {addr:?}: no port"));
        }
        Ok(H2Channel {
            shared: Arc::new(Shared {
                addr: addr.to_owned(),
                authority,
                security,
                sender: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                waiting: Arc::default(),
            }),
        })
    }

    /// The current connection's handle once it can take another stream; `None` if there is no
    /// connection or it has closed.
    async fn current_ready(&self) -> Option<h2::client::SendRequest<Bytes>> {
        let sender = self.shared.sender.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        sender.ready().await.ok()
    }

    /// A handle on a connection that can take another stream: the current one, or a new one if
    /// there is none or it has closed.
    async fn ready_sender(&self) -> Result<h2::client::SendRequest<Bytes>, Status> {
        if let Some(ready) = self.current_ready().await {
            return Ok(ready);
        }
        let _one_at_a_time = self.shared.connecting.lock().await;
        // Someone else may have connected while we waited.
        if let Some(ready) = self.current_ready().await {
            return Ok(ready);
        }
        let sender = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
            .await
            .map_err(|_| Status::unavailable(format!("connecting to {}: timed out", self.shared.addr)))?
            .map_err(|e| Status::unavailable(format!("connecting to {}: {e}", self.shared.addr)))?;
        *self.shared.sender.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
        sender.ready().await.map_err(|e| Status::unavailable(format!("{}: {e}", self.shared.addr)))
    }

    async fn connect(&self) -> Result<h2::client::SendRequest<Bytes>, BoxError> {
        let tcp = tokio::net::TcpStream::connect(&self.shared.addr).await?;
        tcp.set_nodelay(true)?;
        let io = match &self.shared.security.tls {
            Some(tls) => tls.connect(self.shared.authority.host(), tcp).await?,
            None => MaybeTls::Plain(tcp),
        };
        let (sender, mut connection) = h2::client::handshake(io).await?;
        let addr = self.shared.addr.clone();
        let pings = connection.ping_pong();
        let waiting = self.shared.waiting.clone();
        tokio::spawn(async move {
            tokio::select! {
                closed = connection => {
                    if let Err(e) = closed {
                        tracing::debug!(%addr, error = %e, "connection closed");
                    }
                }
                () = keepalive(pings, waiting) => {
                    // Dropping the connection fails its streams and makes the channel reconnect.
                    tracing::debug!(%addr, "no answer to a keepalive ping; connection dropped");
                }
            }
        });
        Ok(sender)
    }

    async fn send(self, req: http::Request<tonic::body::Body>) -> Result<http::Response<ReplyBody>, Status> {
        let (mut parts, body) = req.into_parts();
        let message = collect(body).await?;
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(if self.shared.security.tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP });
        uri.authority = Some(self.shared.authority.clone());
        parts.uri = Uri::from_parts(uri).map_err(|e| Status::internal(format!("request uri: {e}")))?;
        if let Some(token) = &self.shared.security.token
            && !parts.headers.contains_key(http::header::AUTHORIZATION)
        {
            let mut value = http::HeaderValue::try_from(format!("Bearer {}", token.expose()))
                .map_err(|_| Status::invalid_argument("the API token is not a valid header value"))?;
            value.set_sensitive(true);
            parts.headers.insert(http::header::AUTHORIZATION, value);
        }

        let mut sender = self.ready_sender().await?;
        let _waiting = Waiting::new(&self.shared.waiting);
        let (reply, stream) = sender.send_request(http::Request::from_parts(parts, ()), false).map_err(never_sent)?;
        let reply = send_and_read_head(stream, reply, message).await?;
        Ok(reply.map(|recv| ReplyBody { recv, data_done: false }))
    }
}

/// Sends a call's message and waits for the head of its reply.
///
/// A server may answer before it has read the request, as a refusal at its gate does, and then
/// reset the stream. If both arrive before the message is sent (this task descheduled between
/// the headers and the message, on a loaded machine), sending fails with "inactive stream",
/// but the answer is already here and it is the call's outcome: taken as a broken connection,
/// a PERMISSION_DENIED came back as UNKNOWN.
async fn send_and_read_head(
    mut stream: h2::SendStream<Bytes>,
    reply: h2::client::ResponseFuture,
    message: Bytes,
) -> Result<http::Response<h2::RecvStream>, Status> {
    if let Err(sending) = stream.send_data(message, true) {
        // The stream is closed, so whatever the server answered has been received already.
        return match std::pin::pin!(reply).poll(&mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(Ok(answer)) => Ok(answer),
            Poll::Ready(Err(reset)) => Err(maybe_sent(reset)),
            Poll::Pending => Err(maybe_sent(sending)),
        };
    }
    reply.await.map_err(maybe_sent)
}

/// Pings the peer every [`KEEPALIVE_EVERY`] while no call is `waiting`, every
/// [`BUSY_PING_EVERY`] while one is; returns when a ping goes unanswered for its timeout (or
/// cannot be sent).
async fn keepalive(pings: Option<h2::PingPong>, waiting: Arc<AtomicUsize>) {
    let Some(mut pings) = pings else { return std::future::pending().await };
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(BUSY_PING_EVERY).await; // the check period, not a synchronisation
        let timeout = if waiting.load(Ordering::Relaxed) > 0 {
            BUSY_PING_TIMEOUT
        } else if last.elapsed() >= KEEPALIVE_EVERY {
            KEEPALIVE_TIMEOUT
        } else {
            continue;
        };
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => last = tokio::time::Instant::now(),
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// The request message, which tonic encodes into the body as one frame for a unary call.
async fn collect(mut body: tonic::body::Body) -> Result<Bytes, Status> {
    let mut parts: Vec<Bytes> = Vec::with_capacity(1);
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame?;
        if let Ok(data) = frame.into_data() {
            parts.push(data);
        }
    }
    Ok(match parts.len() {
        1 => parts.pop().unwrap_or_default(),
        _ => parts.concat().into(),
    })
}

/// The request did not leave: safe to send again anywhere.
fn never_sent(e: h2::Error) -> Status {
    Status::unavailable(format!("sending request: {e}"))
}

/// The request may have reached the server; only a refused stream says it was not processed.
fn maybe_sent(e: h2::Error) -> Status {
    if e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        Status::unavailable(format!("stream refused: {e}"))
    } else {
        Status::unknown(format!("connection broke during the call: {e}"))
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = http::Response<ReplyBody>;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}

/// A reply body read straight from the HTTP/2 stream: the data frames, then the trailers that
/// carry the gRPC status.
#[derive(Debug)]
pub struct ReplyBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    // Hand the window back so that long replies keep flowing.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(maybe_sent(e)))),
                Poll::Ready(None) => this.data_done = true,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(maybe_sent(e)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use crate::pb::promises_client::PromisesClient;
    use tonic::Code;

    fn get_request() -> pb::GetRequest {
        pb::GetRequest { id: "p".into(), consistency: 0 }
    }

    #[test]
    fn addresses_need_a_host_and_a_port() {
        assert!(H2Channel::new("127.0.0.1:7001").is_ok());
        assert!(H2Channel::new("127.0.0.1").is_err());
        assert!(H2Channel::new("not a host:port").is_err());
    }

    #[tokio::test]
    async fn nobody_listening_is_unavailable_and_the_request_never_left() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let channel = H2Channel::new(&addr).expect("addr");
        let status = PromisesClient::new(channel).get(get_request()).await.expect_err("no server");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    /// A server that reads one request and then drops the connection: the call may have been
    /// processed, so it must not look like a clean refusal. The next call reconnects.
    #[tokio::test]
    async fn a_connection_lost_mid_call_is_unknown_and_the_next_call_reconnects() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let server = tokio::spawn(async move {
            let mut paths = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.expect("accept");
                let mut conn = h2::server::handshake(tcp).await.expect("handshake");
                let (req, _respond) = conn.accept().await.expect("a request").expect("no error");
                paths.push((req.uri().path().to_owned(), req.uri().authority().map(|a| a.to_string())));
                drop(conn); // gone without an answer
            }
            paths
        });
        let channel = H2Channel::new(&addr).expect("addr");
        let mut client = PromisesClient::new(channel);
        for _ in 0..2 {
            let status = client.get(get_request()).await.expect_err("connection dropped");
            assert_eq!(status.code(), Code::Unknown, "{status:?}");
        }
        let paths = server.await.expect("server");
        assert_eq!(paths.len(), 2, "the second call made a new connection");
        assert_eq!(paths[0], ("/vow.v1.Promises/Get".to_owned(), Some(addr.clone())));
    }

    /// A server that refuses a call as soon as its headers arrive, without reading its message,
    /// and resets the stream (as hyper does for a body it did not read). A client that sends
    /// its message only after both arrived (it was descheduled in between) must still report
    /// the refusal, not a broken connection.
    #[tokio::test]
    async fn an_answer_that_comes_before_the_message_is_sent_is_the_outcome() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut conn = h2::server::handshake(tcp).await.expect("handshake");
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                let head = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "7")
                    .body(())
                    .expect("head");
                respond.send_response(head, true).expect("refusal sent");
                // Reset once the refusal has gone out: a reset sent at once would drop the
                // queued answer with it. The accept loop drives the connection meanwhile.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    respond.send_reset(h2::Reason::NO_ERROR);
                });
            }
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = h2::client::handshake(tcp).await.expect("handshake");
        tokio::spawn(conn);
        let mut sender = sender.ready().await.expect("ready");
        let request = || http::Request::post("http://vow/vow.v1.Promises/Create").body(()).expect("request");
        let message = Bytes::from_static(&[0, 0, 0, 0, 0]);

        // Waits until the server's reset has arrived, as when the task was descheduled that long.
        let reset = |mut stream: h2::SendStream<Bytes>| async move {
            std::future::poll_fn(|cx| stream.poll_reset(cx)).await.expect("reset");
            stream
        };

        // The situation: by the time the message goes, the stream is gone.
        let (_reply, late) = sender.send_request(request(), false).expect("headers");
        let mut late = reset(late).await;
        assert!(late.send_data(message.clone(), true).is_err(), "the refusal and the reset came first");

        let (reply, stream) = sender.send_request(request(), false).expect("headers");
        let stream = reset(stream).await;
        let answer = send_and_read_head(stream, reply, message).await.expect("the refusal is the answer");
        assert_eq!(answer.headers()["grpc-status"], "7");
        server.abort();
    }

    /// Answers one request with an empty message and OK on `conn`.
    async fn answer_ok(conn: &mut h2::server::Connection<tokio::net::TcpStream, Bytes>) {
        let (_req, mut respond) = conn.accept().await.expect("a request").expect("no error");
        let head = http::Response::builder().header("content-type", "application/grpc").body(()).expect("head");
        let mut stream = respond.send_response(head, false).expect("head sent");
        stream.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false).expect("message sent");
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        stream.send_trailers(trailers).expect("trailers sent");
    }

    /// A server that answers one call and then goes silent without closing the connection (as a
    /// host cut off by a partition does), and answers on any new connection. The client must
    /// notice the silence by its keepalive pings and reconnect, instead of sending every later
    /// call into the dead connection.
    #[tokio::test]
    async fn a_silent_connection_is_dropped_and_replaced() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (go_silent, silence) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut silent = h2::server::handshake(tcp).await.expect("handshake");
            answer_ok(&mut silent).await;
            // Drive the connection (the reply goes out) until told to go silent; from then on
            // keep it open but never poll it again: no replies, no pongs.
            tokio::select! {
                _ = async { while let Some(Ok(_)) = silent.accept().await {} } => {}
                _ = silence => {}
            }
            let (tcp, _) = listener.accept().await.expect("a second connection");
            let mut fresh = h2::server::handshake(tcp).await.expect("handshake");
            answer_ok(&mut fresh).await;
            tokio::spawn(async move { while let Some(Ok(_)) = fresh.accept().await {} });
            silent
        });
        let mut client = PromisesClient::new(H2Channel::new(&addr).expect("addr"));
        client.get(get_request()).await.expect("the first call is answered");
        let _ = go_silent.send(());
        let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut req = tonic::Request::new(get_request());
            req.set_timeout(Duration::from_millis(300));
            match tokio::time::timeout(Duration::from_millis(300), client.get(req)).await {
                Ok(Ok(_)) => break,
                _ => assert!(tokio::time::Instant::now() < give_up, "never reconnected past the silent connection"),
            }
        }
        drop(server);
    }

    /// A call already in flight when its peer goes silent fails within the busy ping's few
    /// hundred milliseconds (test timings), long before its own 10 s deadline or the idle
    /// keepalive would notice: it is reported maybe-sent, so the caller retries elsewhere.
    #[tokio::test]
    async fn a_call_in_flight_to_a_silent_peer_fails_fast() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (go_silent, silence) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut conn = h2::server::handshake(tcp).await.expect("handshake");
            answer_ok(&mut conn).await;
            // Take the next call without answering, then stop polling: no reply, no pongs.
            let held = tokio::select! {
                next = conn.accept() => next,
                _ = silence => None,
            };
            (conn, held)
        });
        let mut client = PromisesClient::new(H2Channel::new(&addr).expect("addr"));
        client.get(get_request()).await.expect("the first call is answered");
        let call = tokio::spawn(async move {
            let mut req = tonic::Request::new(get_request());
            req.set_timeout(Duration::from_secs(10));
            let started = tokio::time::Instant::now();
            (client.get(req).await, started.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = go_silent.send(());
        let (result, took) = call.await.expect("call task");
        let status = result.expect_err("the peer never answers");
        assert_eq!(status.code(), tonic::Code::Unknown, "maybe sent: {status:?}");
        assert!(took < KEEPALIVE_EVERY, "noticed after {took:?}, not by the busy ping");
        drop(server);
    }
}
