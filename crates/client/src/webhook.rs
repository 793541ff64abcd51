//! Checking webhook deliveries, for a receiver written in Rust (and the one definition of the
//! signature scheme, which the server signs with).
//!
//! A delivery carries `Vow-Signature: t=<ms since the epoch>,v1=<hex>`, where `<hex>` is the
//! HMAC-SHA256 of `"<t>.<body>"` keyed with the webhook secret's text. The secret is derived
//! from the cluster's signing key ([`secret_of`]; `vow webhook-secret` prints it), so a
//! receiver can check deliveries without holding the key that makes completion tokens.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The webhook secret of the cluster's signing key (the first line of its key file).
pub fn secret_of(key: &[u8]) -> String {
    hex(&mac(key, &[b"vow webhook secret v1"]))
}

/// The hex signature of `body` sent at `t_ms` under `secret`.
pub fn sign(secret: &str, t_ms: i64, body: &[u8]) -> String {
    hex(&mac(secret.as_bytes(), &[format!("{t_ms}.").as_bytes(), body]))
}

/// Why a delivery does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("the Vow-Signature header is not `t=<ms>,v1=<hex>`")]
    Malformed,
    #[error("the signature does not match the body under this secret")]
    Mismatch,
    #[error("the delivery was signed {0} ms away from now, more than the tolerance")]
    Stale(i64),
}

/// Checks a delivery's `Vow-Signature` header against its body, and that it was signed within
/// `tolerance_ms` of `now_ms` (a replayed old delivery is refused; retries are signed afresh).
pub fn verify(secret: &str, header: &str, body: &[u8], now_ms: i64, tolerance_ms: i64) -> Result<(), Invalid> {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1 = Some(value),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return Err(Invalid::Malformed) };
    let Some(given) = unhex(v1) else { return Err(Invalid::Malformed) };
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).map_err(|_| Invalid::Mismatch)?;
    m.update(format!("{t}.").as_bytes());
    m.update(body);
    // Constant time.
    m.verify_slice(&given).map_err(|_| Invalid::Mismatch)?;
    if (now_ms - t).abs() > tolerance_ms {
        return Err(Invalid::Stale(now_ms - t));
    }
    Ok(())
}

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC takes keys of any length.
    let Ok(mut m) = <Hmac<Sha256> as Mac>::new_from_slice(key) else { return Vec::new() };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_delivery_verifies_and_a_changed_one_does_not() {
        let secret = secret_of(b"a key of at least thirty-two bytes!!");
        let header = format!("t=1000,v1={}", sign(&secret, 1000, b"{\"a\":1}"));
        assert_eq!(verify(&secret, &header, b"{\"a\":1}", 1500, 300_000), Ok(()));
        assert_eq!(verify(&secret, &header, b"{\"a\":2}", 1500, 300_000), Err(Invalid::Mismatch));
        assert_eq!(verify("another", &header, b"{\"a\":1}", 1500, 300_000), Err(Invalid::Mismatch));
        assert_eq!(verify(&secret, &header, b"{\"a\":1}", 400_000, 300_000), Err(Invalid::Stale(399_000)));
        for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=zz"] {
            assert_eq!(verify(&secret, bad, b"", 1, 10), Err(Invalid::Malformed), "{bad}");
        }
    }
}
