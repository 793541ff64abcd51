//! Talking to a node below the client libraries: gRPC calls over a bare HTTP/2 connection (any
//! headers, any body, any framing of the message), raw HTTP/2 frames, raw HTTP/1 requests, and
//! what a process uses, read from /proc.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How a raw gRPC call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// grpc-status 0, with the reply's messages (each without its 5-byte prefix), in order.
    Ok(Vec<Vec<u8>>),
    /// Any other gRPC status (from the headers of a trailers-only reply or from the trailers).
    Status(i32, String),
    /// An HTTP status without any gRPC status (e.g. 415 for a content type that is not gRPC).
    Http(u16),
    /// The server reset the stream.
    Reset(String),
    /// No answer within the client's wait (long calls: Await, Watch).
    Waiting,
    /// The connection went away.
    Closed(String),
}

pub async fn h2_connect(addr: &str) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    h2_connect_with(addr, h2::client::Builder::new()).await
}

pub async fn h2_connect_with(
    addr: &str,
    builder: h2::client::Builder,
) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let (send, conn) = builder.handshake(tcp).await.context("HTTP/2 handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// The 5-byte gRPC message prefix and the message.
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Sends one call and reads its reply for at most `wait`.
pub async fn call(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    headers: &[(String, Vec<u8>)],
    body: Vec<u8>,
    wait: Duration,
) -> Outcome {
    match tokio::time::timeout(wait, call_inner(send, path, headers, body)).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => match e.downcast_ref::<h2::Error>() {
            Some(h2) if h2.is_reset() || h2.is_remote() && h2.reason().is_some() && !h2.is_go_away() => {
                Outcome::Reset(format!("{h2}"))
            }
            _ => Outcome::Closed(format!("{e:#}")),
        },
        Err(_) => Outcome::Waiting,
    }
}

async fn call_inner(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    headers: &[(String, Vec<u8>)],
    body: Vec<u8>,
) -> anyhow::Result<Outcome> {
    let mut request = http::Request::builder().method("POST").uri(format!("http://vow{path}"));
    for (name, value) in headers {
        request = request.header(name.as_str(), http::HeaderValue::from_bytes(value)?);
    }
    let mut ready = send.clone().ready().await?;
    let (response, mut stream) = ready.send_request(request.body(())?, false)?;
    stream.send_data(Bytes::from(body), true)?;
    let response = response.await?;
    let status = response.status().as_u16();
    let grpc = |h: &http::HeaderMap| {
        let code = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
        // grpc-message is percent-encoded.
        let message = h.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or_default();
        let message = form_urlencoded::parse(format!("m={message}").as_bytes())
            .next()
            .map(|(_, m)| m.into_owned())
            .unwrap_or_default();
        Some(Outcome::Status(code, message))
    };
    if let Some(o) = grpc(response.headers()) {
        return Ok(o);
    }
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(data) = body.data().await {
        let data = data?;
        let _ = body.flow_control().release_capacity(data.len());
        bytes.extend_from_slice(&data);
    }
    let trailers = body.trailers().await?;
    Ok(match trailers.as_ref().and_then(grpc) {
        Some(Outcome::Status(0, _)) => Outcome::Ok(split_messages(&bytes)),
        Some(o) => o,
        None => Outcome::Http(status),
    })
}

/// The messages of a gRPC body (a partial last one is dropped).
fn split_messages(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        let Some(message) = b.get(5..5 + len) else { break };
        out.push(message.to_vec());
        b = &b[5 + len..];
    }
    out
}

/// Writes `bytes` on a fresh connection and reads whatever comes back until the server closes
/// it or `wait` passes. Returns the bytes read and whether the server closed the connection.
pub async fn exchange(addr: &str, bytes: &[u8], wait: Duration) -> anyhow::Result<(Vec<u8>, bool)> {
    let mut tcp = TcpStream::connect(addr).await?;
    // The server may close before reading it all: that is an answer too.
    let _ = tcp.write_all(bytes).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok((got, true)),
            Ok(Ok(n)) => {
                if got.len() < 64 << 10 {
                    got.extend_from_slice(&buf[..n]);
                }
            }
            Err(_) => return Ok((got, false)),
        }
    }
}

/// The HTTP status code at the start of a raw HTTP/1 response.
pub fn http_status(response: &[u8]) -> Option<u16> {
    let line = response.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

/// The resident memory of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .context("no VmRSS")?;
    Ok(kb << 10)
}

/// Whether process `pid` is still running (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}
