//! Webhooks: what `Subscribe` (or a Create's `webhooks`) registers, and what one delivery sends.
//!
//! A subscription is a continuation on the promise's shard with the `Notify` action: the same
//! replicated record, ready index and leader executor as a pipeline step, so it survives
//! restarts and leader changes the same way (see `executor.rs`). Its id is derived from what
//! it says (promise, URL, headers), so subscribing twice is one subscription and a retried
//! Subscribe registers nothing new.
//!
//! A delivery POSTs `{"subscriptionId", "promise"}` (the record in the protobuf JSON mapping)
//! with `Vow-Signature: t=<ms since the epoch>,v1=<hex HMAC-SHA256("<t>.<body>")>` under the
//! cluster's webhook secret ([`crate::tokens::CompletionKeys::webhook_secret`]), and
//! `Idempotency-Key: <subscription id>` on every attempt.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use vow_api::v1 as pb;
use vow_core::pipeline::{Action, Continuation, MAX_URL_BYTES, On};
use vow_core::{Limits, PromiseId};

/// How long after the settlement a delivery is retried before it is given up (a 410 answer
/// gives it up at once).
pub const RETRY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Subscription ids start with this.
pub const ID_PREFIX: &str = "sub-";

/// The subscription of `url` (with `headers`) to `promise`'s settlement, or why it is refused.
pub fn subscription(
    limits: &Limits,
    promise: &PromiseId,
    url: &str,
    headers: BTreeMap<String, String>,
) -> Result<Continuation, String> {
    if !url.starts_with("http://") || url.len() > MAX_URL_BYTES || url.chars().any(char::is_whitespace) {
        return Err(format!(
            "a webhook URL is http:// (https:// comes with TLS), at most {MAX_URL_BYTES} bytes, with no spaces"
        ));
    }
    limits.check_tags(&headers).map_err(|e| format!("webhook headers: {}", e.0))?;
    let mut hash = Sha256::new();
    for part in [promise.as_str(), url] {
        hash.update(part.len().to_be_bytes());
        hash.update(part);
    }
    for (k, v) in &headers {
        hash.update(k.len().to_be_bytes());
        hash.update(k);
        hash.update(v.len().to_be_bytes());
        hash.update(v);
    }
    let digest: String = hash.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
    Ok(Continuation {
        id: format!("{ID_PREFIX}{digest}"),
        sources: vec![promise.clone()],
        target: promise.clone(),
        combinator: None,
        on: On::Settled,
        action: Action::Notify { url: url.to_owned(), headers },
    })
}

/// The body of a delivery.
pub fn body(subscription_id: &str, promise: pb::Promise) -> Vec<u8> {
    let body = serde_json::json!({ "subscriptionId": subscription_id, "promise": promise });
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscription_is_named_by_what_it_says() {
        let limits = Limits::default();
        let p = PromiseId::new_unchecked("order-1");
        let a = subscription(&limits, &p, "http://h/x", BTreeMap::new()).expect("valid");
        let again = subscription(&limits, &p, "http://h/x", BTreeMap::new()).expect("valid");
        assert_eq!(a, again, "the same subscription twice is one");
        let other_url = subscription(&limits, &p, "http://h/y", BTreeMap::new()).expect("valid");
        let headers = BTreeMap::from([("k".to_owned(), "v".to_owned())]);
        let other_headers = subscription(&limits, &p, "http://h/x", headers).expect("valid");
        assert!(a.id != other_url.id && a.id != other_headers.id && other_url.id != other_headers.id);
        assert!(a.id.starts_with(ID_PREFIX) && a.target == p && a.sources == [p.clone()]);
        for bad in ["https://h/x", "ftp://h", "http://h/a b", ""] {
            assert!(subscription(&limits, &p, bad, BTreeMap::new()).is_err(), "{bad}");
        }
    }
}
