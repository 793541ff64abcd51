//! Completion tokens: capabilities that let an outside system settle one promise and nothing
//! else.
//!
//! A Create that asks for one (`completion_token_ttl_ms`) gets back
//! `vct1.<payload>.<mac>`: the payload (base64url JSON `{"id", "ops", "exp"}`) says which
//! promise, which settle operations and until when (ms since the epoch); the MAC is
//! HMAC-SHA256 over `vct1.<payload>` under the cluster's completion key. Any node verifies it
//! without state, so the promise's record does not change and a token cannot be revoked before
//! it expires (settling the promise makes it useless).
//!
//! Keys come from a file, one per line, at least 32 bytes each: the first signs, every one
//! verifies, so a rotation is "add the new key first, keep the old one second until the tokens it
//! signed have expired, then drop it". The file is read again when it changes (checked at most
//! once a second), so a rotation needs no restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use vow_client::tls::Reloading;
use vow_core::{PromiseId, SettleAs};

const PREFIX: &str = "vct1.";
/// Shortest key accepted: HMAC-SHA256's own output size.
pub const MIN_KEY_BYTES: usize = 32;
/// At most this many keys are in use at once (the signing key and the ones being retired).
const MAX_KEYS: usize = 4;
/// Longest token lifetime a Create may ask for (the largest `uint32` of milliseconds is ~49 days).
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The settle operations a token may allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Resolve,
    Reject,
    Cancel,
}

impl From<SettleAs> for Operation {
    fn from(s: SettleAs) -> Operation {
        match s {
            SettleAs::Resolve => Operation::Resolve,
            SettleAs::Reject => Operation::Reject,
            SettleAs::Cancel => Operation::Cancel,
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Resolve => "resolve",
            Operation::Reject => "reject",
            Operation::Cancel => "cancel",
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Claims {
    id: String,
    ops: Vec<Operation>,
    exp: i64,
}

/// Why a presented token does not allow the settle. The message names the reason, never the
/// token or a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the completion token is malformed")]
    Malformed,
    #[error("the completion token's signature does not verify under this cluster's keys")]
    BadSignature,
    #[error("the completion token expired")]
    Expired,
    #[error("the completion token is for another promise")]
    OtherPromise,
    #[error("the completion token does not allow {0}")]
    OperationNotAllowed(Operation),
    #[error("this cluster has no completion-token keys (vowd --completion-keys-file)")]
    NoKeys,
}

/// The node's completion keys. Cheap to clone.
#[derive(Clone)]
pub struct CompletionKeys {
    keys: Arc<Keys>,
}

/// Where the keys in use come from.
enum Keys {
    /// Inline keys, or none (tokens are neither issued nor accepted).
    Fixed(Arc<Vec<Vec<u8>>>),
    /// A key file, followed as it changes.
    File(PathBuf, Reloading<Vec<Vec<u8>>>),
}

impl fmt::Debug for CompletionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys themselves.
        let path = match &*self.keys {
            Keys::File(path, _) => Some(path),
            Keys::Fixed(_) => None,
        };
        f.debug_struct("CompletionKeys").field("path", &path).finish_non_exhaustive()
    }
}

impl CompletionKeys {
    /// No keys: a Create asking for a token and a settle presenting one are refused.
    pub fn none() -> CompletionKeys {
        CompletionKeys { keys: Arc::new(Keys::Fixed(Arc::default())) }
    }

    /// Keys from `path`, which must exist and hold at least one valid key. The file is read
    /// again when it changes; a version that does not parse keeps the last good keys (and says
    /// so in the log).
    pub fn from_file(path: &Path) -> anyhow::Result<CompletionKeys> {
        let p = path.to_owned();
        let keys =
            Reloading::new("completion keys", vec![p.clone()], move || read_keys(&p).map_err(|e| format!("{e:#}")))
                .map_err(anyhow::Error::msg)?;
        Ok(CompletionKeys { keys: Arc::new(Keys::File(path.to_owned(), keys)) })
    }

    /// Keys given inline (`VOW_COMPLETION_KEYS`, comma-separated), the first signing.
    pub fn from_list(list: &str) -> anyhow::Result<CompletionKeys> {
        let keys = check_keys(list.split(',').map(str::trim).filter(|k| !k.is_empty()), "VOW_COMPLETION_KEYS")?;
        Ok(CompletionKeys { keys: Arc::new(Keys::Fixed(Arc::new(keys))) })
    }

    /// Keys from `path`, creating it with one random key (mode 0600) if it does not exist: for a
    /// single node, whose tokens no other node needs to verify.
    pub fn generated_at(path: &Path) -> anyhow::Result<CompletionKeys> {
        if !path.exists() {
            let key: [u8; 32] = rand::random();
            let line = hex(&key);
            write_private(path, &format!("{line}\n"))
                .with_context(|| format!("writing a completion key to {}", path.display()))?;
        }
        CompletionKeys::from_file(path)
    }

    /// The keys in use now.
    fn current(&self) -> Arc<Vec<Vec<u8>>> {
        match &*self.keys {
            Keys::Fixed(keys) => keys.clone(),
            Keys::File(_, keys) => keys.get(),
        }
    }

    /// Whether tokens can be issued at all.
    pub fn configured(&self) -> bool {
        !self.current().is_empty()
    }

    /// A token for settling `id` with `ops` until `expires_ms`.
    pub fn issue(&self, id: &PromiseId, ops: &[Operation], expires_ms: i64) -> Result<String, TokenError> {
        let keys = self.current();
        let key = keys.first().ok_or(TokenError::NoKeys)?;
        let claims = Claims { id: id.to_string(), ops: ops.to_vec(), exp: expires_ms };
        let payload = serde_json::to_vec(&claims).map_err(|_| TokenError::Malformed)?;
        let signed = format!("{PREFIX}{}", B64.encode(payload));
        let mac = mac(key, signed.as_bytes()).finalize().into_bytes();
        Ok(format!("{signed}.{}", B64.encode(mac)))
    }

    /// The secret webhook receivers verify deliveries with: derived from the signing key
    /// (HMAC-SHA256 of a fixed label, hex), so handing it out does not hand out the power to
    /// make completion tokens. `None` without keys.
    pub fn webhook_secret(&self) -> Option<String> {
        self.current().first().map(|key| vow_client::webhook::secret_of(key))
    }

    /// The `Vow-Signature` header of a delivery of `body` at `t_ms`: `t=<t_ms>,v1=<hex>`, the
    /// HMAC-SHA256 of `"<t_ms>.<body>"` under [`CompletionKeys::webhook_secret`].
    pub fn sign_webhook(&self, t_ms: i64, body: &[u8]) -> Option<String> {
        let secret = self.webhook_secret()?;
        Some(format!("t={t_ms},v1={}", vow_client::webhook::sign(&secret, t_ms, body)))
    }

    /// Checks that `token` allows `op` on `id` at `now_ms`.
    pub fn verify(&self, token: &str, id: &PromiseId, op: Operation, now_ms: i64) -> Result<(), TokenError> {
        let keys = self.current();
        if keys.is_empty() {
            return Err(TokenError::NoKeys);
        }
        let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let payload = signed.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let tag = B64.decode(tag).map_err(|_| TokenError::Malformed)?;
        // Constant-time comparison under each key in use.
        if !keys.iter().any(|k| mac(k, signed.as_bytes()).verify_slice(&tag).is_ok()) {
            return Err(TokenError::BadSignature);
        }
        let claims: Claims =
            B64.decode(payload).ok().and_then(|p| serde_json::from_slice(&p).ok()).ok_or(TokenError::Malformed)?;
        if claims.id != id.as_str() {
            return Err(TokenError::OtherPromise);
        }
        if now_ms >= claims.exp {
            return Err(TokenError::Expired);
        }
        if !claims.ops.contains(&op) {
            return Err(TokenError::OperationNotAllowed(op));
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn mac(key: &[u8], data: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length; new_from_slice cannot fail for it.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key"));
    m.update(data);
    m
}

/// Reads a key file: one key per line (its bytes as written; blank lines and `#` comments
/// skipped), the first signing.
fn read_keys(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    check_keys(lines, &path.display().to_string())
}

fn check_keys<'a>(keys: impl Iterator<Item = &'a str>, source: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let keys: Vec<Vec<u8>> = keys.map(|k| k.as_bytes().to_vec()).collect();
    if keys.is_empty() {
        bail!("{source} holds no completion key");
    }
    if let Some(n) = keys.iter().position(|k| k.len() < MIN_KEY_BYTES) {
        bail!("{source}: key {} is shorter than {MIN_KEY_BYTES} bytes", n + 1);
    }
    if keys.len() > MAX_KEYS {
        bail!("{source} holds {} keys; at most {MAX_KEYS} are in use at once", keys.len());
    }
    Ok(keys)
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const KEY_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn keys(dir: &Path, lines: &str) -> CompletionKeys {
        let path = dir.join("keys");
        std::fs::write(&path, lines).expect("write keys");
        CompletionKeys::from_file(&path).expect("load keys")
    }

    fn id(s: &str) -> PromiseId {
        PromiseId::new_unchecked(s)
    }

    #[test]
    fn a_token_allows_its_operations_on_its_promise_until_it_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = keys(dir.path(), &format!("{KEY_A}\n"));
        let t = k.issue(&id("task-1"), &[Operation::Resolve, Operation::Reject], 1_000).expect("issue");
        assert_eq!(k.verify(&t, &id("task-1"), Operation::Resolve, 999), Ok(()));
        assert_eq!(k.verify(&t, &id("task-1"), Operation::Reject, 0), Ok(()));
        assert_eq!(k.verify(&t, &id("task-1"), Operation::Resolve, 1_000), Err(TokenError::Expired));
        assert_eq!(k.verify(&t, &id("task-2"), Operation::Resolve, 0), Err(TokenError::OtherPromise));
        assert_eq!(
            k.verify(&t, &id("task-1"), Operation::Cancel, 0),
            Err(TokenError::OperationNotAllowed(Operation::Cancel))
        );
    }

    #[test]
    fn forged_and_altered_tokens_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = keys(dir.path(), &format!("{KEY_A}\n"));
        let t = k.issue(&id("p"), &[Operation::Resolve], i64::MAX).expect("issue");
        // Another key's token, a payload swapped for another promise's, garbage.
        let other = tempfile::tempdir().expect("tempdir");
        let forged = keys(other.path(), &format!("{KEY_B}\n")).issue(&id("p"), &[Operation::Resolve], i64::MAX);
        assert_eq!(k.verify(&forged.expect("issue"), &id("p"), Operation::Resolve, 0), Err(TokenError::BadSignature));
        let (_, tag) = t.rsplit_once('.').expect("tag");
        let claims = B64.encode(br#"{"id":"q","ops":["resolve"],"exp":9223372036854775807}"#);
        let swapped = format!("{PREFIX}{claims}.{tag}");
        assert_eq!(k.verify(&swapped, &id("q"), Operation::Resolve, 0), Err(TokenError::BadSignature));
        for junk in ["", "vct1.", "vct1..", "Bearer x", "vct1.e30.e30", &t[..t.len() - 3]] {
            assert!(k.verify(junk, &id("p"), Operation::Resolve, 0).is_err(), "{junk:?}");
        }
        assert_eq!(CompletionKeys::none().verify(&t, &id("p"), Operation::Resolve, 0), Err(TokenError::NoKeys));
    }

    #[test]
    fn rotation_accepts_both_keys_and_signs_with_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = keys(dir.path(), &format!("{KEY_A}\n"));
        let by_old = old.issue(&id("p"), &[Operation::Resolve], i64::MAX).expect("issue");
        // The file now lists the new key first and keeps the old one; the node notices.
        std::fs::write(dir.path().join("keys"), format!("# rotating\n{KEY_B}\n{KEY_A}\n")).expect("write");
        let Keys::File(_, reloading) = &*old.keys else { panic!("a key file") };
        reloading.look_now();
        assert_eq!(old.verify(&by_old, &id("p"), Operation::Resolve, 0), Ok(()), "old tokens still verify");
        let by_new = old.issue(&id("p"), &[Operation::Resolve], i64::MAX).expect("issue");
        let only_new = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            keys(only_new.path(), &format!("{KEY_B}\n")).verify(&by_new, &id("p"), Operation::Resolve, 0),
            Ok(())
        );
    }

    #[test]
    fn webhook_signatures_verify_with_the_derived_secret_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = keys(dir.path(), &format!("{KEY_A}\n"));
        let secret = k.webhook_secret().expect("keys");
        assert_eq!(secret, vow_client::webhook::secret_of(KEY_A.as_bytes()));
        assert_ne!(secret.as_bytes(), KEY_A.as_bytes(), "the secret is not the key");
        let header = k.sign_webhook(1_700, b"{}").expect("keys");
        assert_eq!(vow_client::webhook::verify(&secret, &header, b"{}", 1_700, 0), Ok(()));
        assert_ne!(header, k.sign_webhook(1_700, b"{ }").expect("keys"), "the body is signed");
        assert_ne!(header, k.sign_webhook(1_701, b"{}").expect("keys"), "the time is signed");
        assert_eq!(CompletionKeys::none().sign_webhook(1, b""), None);
    }

    #[test]
    fn key_files_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        for (text, says) in
            [("", "no completion key"), ("short\n", "shorter than 32"), ("\n# c\n", "no completion key")]
        {
            std::fs::write(&path, text).expect("write");
            let err = CompletionKeys::from_file(&path).expect_err(text);
            assert!(format!("{err:#}").contains(says), "{err:#}");
        }
        let generated = dir.path().join("generated");
        let k = CompletionKeys::generated_at(&generated).expect("generate");
        let t = k.issue(&id("p"), &[Operation::Reject], i64::MAX).expect("issue");
        let again = CompletionKeys::generated_at(&generated).expect("reuse");
        assert_eq!(again.verify(&t, &id("p"), Operation::Reject, 0), Ok(()), "the same key after a restart");
    }
}
