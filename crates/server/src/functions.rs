//! Calling users' HTTP endpoints: one attempt of an `Invoke` continuation, classified, the
//! best-effort prewarm request, and one attempt of a webhook delivery. The retry policy is the executor's; this module only says what
//! one answer means (issue #15's rules: 2xx resolves, `202` + `Vow-Promise` adopts a promise,
//! 4xx other than 408/429 rejects for good, everything else is transient).
//!
//! One pooled hyper client per node (keep-alive connections, HTTP/1.1), with a per-attempt
//! timeout; how many calls run at once is bounded by the executor.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use vow_core::{PromiseId, State, Value};

/// An attempt's timeout when the continuation gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest prewarm request: it only has to reach the platform.
const PREWARM_TIMEOUT: Duration = Duration::from_secs(2);
/// A webhook attempt's timeout.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Most of a webhook receiver's answer that is read (and kept for the last error).
const WEBHOOK_ANSWER_BYTES: usize = 4096;

/// What one webhook delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// 2xx.
    Delivered,
    /// 410 Gone: the receiver wants no more; why.
    Gone(String),
    /// Anything else: worth another attempt; why.
    Retry(String),
}

/// Why reading an answer failed.
enum ReadError {
    TooLarge,
    Other(String),
}

/// What one call of a function came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 2xx: resolve the target with this value.
    Resolve(Value),
    /// 202 with `Vow-Promise`: the target settles as this promise settles.
    Adopt(PromiseId),
    /// A final refusal (4xx other than 408 and 429): reject the target with this value.
    Reject(Value),
    /// Worth another attempt (5xx, 408, 429, timeout, connection error); why.
    Transient(String),
}

/// What a function is called with.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub url: &'a str,
    pub headers: &'a BTreeMap<String, String>,
    pub timeout: Duration,
    pub continuation: &'a str,
    pub source: &'a PromiseId,
    pub source_state: State,
    pub target: &'a PromiseId,
    pub input: &'a Value,
}

/// The node's HTTP client for functions. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Functions {
    client: Client<HttpConnector, Full<Bytes>>,
    /// Largest answer body taken in: a bigger one is a final rejection naming the limit.
    max_body_bytes: usize,
}

impl Functions {
    pub fn new(max_body_bytes: usize) -> Functions {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector);
        Functions { client, max_body_bytes }
    }

    /// One attempt.
    pub async fn call(&self, call: &Call<'_>) -> Answer {
        let mut request = hyper::Request::post(call.url)
            .header("idempotency-key", call.continuation)
            .header("vow-source-id", call.source.as_str())
            .header("vow-source-state", call.source_state.name())
            .header("vow-target-id", call.target.as_str());
        if let Some(ct) = call.input.headers.get("content-type") {
            request = request.header("content-type", ct);
        }
        for (k, v) in call.headers {
            request = request.header(k.as_str(), v.as_str());
        }
        let request = match request.body(Full::new(Bytes::from(call.input.data.clone()))) {
            Ok(r) => r,
            Err(e) => return Answer::Reject(text(format!("cannot build the request to {}: {e}", call.url))),
        };
        let (parts, body) = match tokio::time::timeout(call.timeout, self.send(request, self.max_body_bytes)).await {
            Err(_) => return Answer::Transient(format!("{} did not answer within {:?}", call.url, call.timeout)),
            Ok(Err(ReadError::TooLarge)) => {
                return Answer::Reject(text(format!(
                    "the answer of {} is larger than {} bytes, the largest value a promise holds",
                    call.url, self.max_body_bytes
                )));
            }
            Ok(Err(ReadError::Other(e))) => return Answer::Transient(format!("calling {}: {e}", call.url)),
            Ok(Ok(answer)) => answer,
        };
        classify(parts.status, &parts.headers, body.to_vec())
    }

    /// Sends `request` and reads its answer, at most `limit` bytes of body.
    async fn send(
        &self,
        request: hyper::Request<Full<Bytes>>,
        limit: usize,
    ) -> Result<(hyper::http::response::Parts, Bytes), ReadError> {
        let response = self.client.request(request).await.map_err(|e| ReadError::Other(e.to_string()))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, limit).collect().await.map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                ReadError::TooLarge
            } else {
                ReadError::Other(format!("reading the answer: {e}"))
            }
        })?;
        Ok((parts, body.to_bytes()))
    }

    /// One attempt of a webhook delivery: POST `body` (JSON) with the signature and
    /// `Idempotency-Key: <subscription>`.
    pub async fn deliver(
        &self,
        url: &str,
        headers: &BTreeMap<String, String>,
        subscription: &str,
        signature: &str,
        body: Vec<u8>,
    ) -> Delivery {
        let mut request = hyper::Request::post(url)
            .header("content-type", "application/json")
            .header("idempotency-key", subscription)
            .header("vow-signature", signature);
        for (k, v) in headers {
            request = request.header(k.as_str(), v.as_str());
        }
        let request = match request.body(Full::new(Bytes::from(body))) {
            Ok(r) => r,
            Err(e) => return Delivery::Gone(format!("cannot build the request to {url}: {e}")),
        };
        match tokio::time::timeout(WEBHOOK_TIMEOUT, self.send(request, WEBHOOK_ANSWER_BYTES)).await {
            Err(_) => Delivery::Retry(format!("{url} did not answer within {WEBHOOK_TIMEOUT:?}")),
            Ok(Err(ReadError::TooLarge)) => Delivery::Retry(format!("{url} answered with an oversized body")),
            Ok(Err(ReadError::Other(e))) => Delivery::Retry(format!("delivering to {url}: {e}")),
            Ok(Ok((parts, _))) if parts.status.is_success() => Delivery::Delivered,
            Ok(Ok((parts, _))) if parts.status == hyper::StatusCode::GONE => {
                Delivery::Gone(format!("{url} answered 410 Gone"))
            }
            Ok(Ok((parts, body))) => Delivery::Retry(format!(
                "{url} answered {}: {}",
                parts.status,
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )),
        }
    }

    /// Tells the function a call is coming: an empty POST with `Vow-Prewarm: 1`. Best effort:
    /// the answer and any error are ignored.
    pub async fn prewarm(&self, url: &str, headers: &BTreeMap<String, String>) {
        let mut request = hyper::Request::post(url).header("vow-prewarm", "1");
        for (k, v) in headers {
            request = request.header(k.as_str(), v.as_str());
        }
        let Ok(request) = request.body(Full::new(Bytes::new())) else { return };
        let _ = tokio::time::timeout(PREWARM_TIMEOUT, async {
            if let Ok(response) = self.client.request(request).await {
                let _ = response.into_body().collect().await;
            }
        })
        .await;
    }
}

fn text(message: String) -> Value {
    Value {
        headers: BTreeMap::from([("content-type".to_owned(), "text/plain; charset=utf-8".to_owned())]),
        data: message.into_bytes(),
    }
}

/// The value an answer carries: its body, with its `Content-Type` and `Vow-*` headers.
fn answer_value(headers: &hyper::HeaderMap, body: Vec<u8>) -> Value {
    let headers = headers
        .iter()
        .filter(|(name, _)| name.as_str() == "content-type" || name.as_str().starts_with("vow-"))
        .filter(|(name, _)| name.as_str() != "vow-promise")
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
        .collect();
    Value { headers, data: body }
}

/// What an answer means, by the rules in the module docs.
pub fn classify(status: hyper::StatusCode, headers: &hyper::HeaderMap, body: Vec<u8>) -> Answer {
    let code = status.as_u16();
    if code == 202
        && let Some(id) = headers.get("vow-promise").and_then(|v| v.to_str().ok())
    {
        return Answer::Adopt(PromiseId::new_unchecked(id.trim()));
    }
    match code {
        200..=299 => Answer::Resolve(answer_value(headers, body)),
        300..=399 => Answer::Reject(text(format!("the function answered {status}; vow does not follow redirects"))),
        408 | 429 => Answer::Transient(format!("the function answered {status}")),
        400..=499 => Answer::Reject(answer_value(headers, body)),
        _ => Answer::Transient(format!(
            "the function answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(code: u16, headers: &[(&'static str, &'static str)]) -> Answer {
        let mut map = hyper::HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, v.parse().unwrap());
        }
        classify(hyper::StatusCode::from_u16(code).unwrap(), &map, b"body".to_vec())
    }

    #[test]
    fn answers_are_classified_by_the_documented_rules() {
        let Answer::Resolve(v) = answer(200, &[("content-type", "image/png"), ("vow-width", "10"), ("server", "x")])
        else {
            panic!("2xx resolves")
        };
        assert_eq!(v.data, b"body");
        assert_eq!(v.headers.keys().collect::<Vec<_>>(), ["content-type", "vow-width"], "only Content-Type and Vow-*");
        assert_eq!(answer(202, &[("vow-promise", "task-7")]), Answer::Adopt(PromiseId::new_unchecked("task-7")));
        assert!(matches!(answer(202, &[]), Answer::Resolve(_)), "202 without Vow-Promise is a plain success");
        assert!(matches!(answer(404, &[]), Answer::Reject(_)));
        assert!(matches!(answer(422, &[]), Answer::Reject(_)));
        assert!(matches!(answer(302, &[]), Answer::Reject(_)), "a redirect is not followed");
        for transient in [408, 429, 500, 503] {
            assert!(matches!(answer(transient, &[]), Answer::Transient(_)), "{transient} is retried");
        }
    }
}
