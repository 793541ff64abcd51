//! Who may call what: the one check every request passes before any handler runs.
//!
//! [`GateLayer`] is a tower layer over `http` requests, put in front of each listener's
//! services: the public gRPC port and the HTTP port check API tokens by role ([`ApiGate`]),
//! the peer port checks that the caller's certificate names a member ([`PeerGate`], built in
//! `api.rs` where the node is known). A refusal answers at once — UNAUTHENTICATED (401) without
//! a credential it recognises, PERMISSION_DENIED (403) for a role that does not allow the call —
//! so a refused request has no effect.
//!
//! API tokens come from a file the node watches (`--auth-file`), one per line:
//! `<role> <name> <token>`, role `admin` (everything), `writer` (create, settle, submit,
//! subscribe, and what a reader may) or `reader` (get, await, search, watch, continuation
//! status, cluster status and the shard map). The name is what logs show; tokens are held only
//! as SHA-256 digests and never appear in a log line or an error. Without the file every caller
//! may do everything, as `vowd --dev` and `vow dev up` run on loopback.
//!
//! A settle (resolve, reject, cancel) may instead present a completion token (`vct1.`...): the
//! gate lets it through and the handler checks the token against the promise (`tokens.rs`), so
//! an outside system holding one can settle that promise and nothing else.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, bail};
use sha2::{Digest, Sha256};
use vow_client::tls::Reloading;

/// Shortest API token accepted in the file: guessing one must be hopeless.
pub const MIN_TOKEN_CHARS: usize = 16;

/// A role, each allowing what the one below it does and more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Reader,
    Writer,
    Admin,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "reader" => Some(Role::Reader),
            "writer" => Some(Role::Writer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// The name with its article, for messages.
    fn a(self) -> &'static str {
        match self {
            Role::Reader => "a reader",
            Role::Writer => "a writer",
            Role::Admin => "an admin",
        }
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: health, probes, metrics, the OpenAPI document.
    Open,
    /// At least this role.
    Role(Role),
    /// A writer, or a completion token (checked by the handler against the promise).
    Settle,
}

/// The access a gRPC method needs, by its path. Unknown methods need an admin (and then are
/// unimplemented): nothing new is open by accident.
pub fn grpc_access(path: &str) -> Access {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or(("", ""));
    match (service, method) {
        ("grpc.health.v1.Health", _) => Access::Open,
        ("grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection", _) => {
            Access::Role(Role::Reader)
        }
        ("vow.v1.Promises", "Get" | "Await" | "Search" | "GetContinuation" | "Watch") => Access::Role(Role::Reader),
        ("vow.v1.Promises", "Create" | "Submit" | "Subscribe") => Access::Role(Role::Writer),
        ("vow.v1.Promises", "Resolve" | "Reject" | "Cancel") => Access::Settle,
        ("vow.v1.Cluster", "Status" | "Locate" | "ShardMap") => Access::Role(Role::Reader),
        _ => Access::Role(Role::Admin),
    }
}

/// The access an HTTP request needs: probes, metrics and the API description are open; the
/// gateway's reads need a reader, its settles a writer or a completion token, its other writes
/// a writer.
pub fn http_access(method: &http::Method, path: &str) -> Access {
    match path {
        "/livez" | "/readyz" | "/metrics" | "/v1/openapi.json" => return Access::Open,
        _ => {}
    }
    if *method == http::Method::GET || *method == http::Method::HEAD {
        return Access::Role(Role::Reader);
    }
    if *method == http::Method::POST {
        let settle = ["/resolve", "/reject", "/cancel"].iter().any(|s| path.ends_with(s));
        return if settle && path.starts_with("/v1/promises/") { Access::Settle } else { Access::Role(Role::Writer) };
    }
    Access::Role(Role::Admin)
}

/// One line of the token file, as held in memory.
#[derive(Debug, Clone)]
struct Grant {
    role: Role,
    name: String,
}

/// The token file's contents: digests of tokens to their grant.
#[derive(Debug, Default)]
struct Grants(HashMap<[u8; 32], Grant>);

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_grants(path: &Path) -> anyhow::Result<Grants> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut grants = Grants::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{} line {}", path.display(), n + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [role, name, token] = fields[..] else {
            bail!("{}: expected `<role> <name> <token>`", at());
        };
        let role = Role::parse(role).with_context(|| format!("{}: role must be admin, writer or reader", at()))?;
        if token.chars().count() < MIN_TOKEN_CHARS {
            bail!("{}: the token of {name:?} is shorter than {MIN_TOKEN_CHARS} characters", at());
        }
        if token.starts_with("vct1.") {
            bail!("{}: an API token cannot start with `vct1.` (that is how completion tokens start)", at());
        }
        if grants.0.insert(digest(token), Grant { role, name: name.to_owned() }).is_some() {
            bail!("{}: the token of {name:?} is listed twice", at());
        }
    }
    if grants.0.is_empty() {
        bail!("{} lists no tokens: every call would be refused", path.display());
    }
    Ok(grants)
}

/// The API tokens of `--auth-file`, followed as the file changes.
#[derive(Debug, Clone)]
pub struct ApiTokens {
    grants: Arc<Reloading<Grants>>,
}

impl ApiTokens {
    pub fn from_file(path: &Path) -> anyhow::Result<ApiTokens> {
        let p: PathBuf = path.to_owned();
        let grants =
            Reloading::new("API tokens", vec![p.clone()], move || parse_grants(&p).map_err(|e| format!("{e:#}")))
                .map_err(anyhow::Error::msg)?;
        Ok(ApiTokens { grants: Arc::new(grants) })
    }

    fn grant(&self, token: &str) -> Option<Grant> {
        self.grants.get().0.get(&digest(token)).cloned()
    }
}

/// Why a request is refused; the message names the reason and the caller's name, never a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No credential, or one that is not known (UNAUTHENTICATED, 401).
    Unauthenticated(String),
    /// A known caller whose role does not allow the call (PERMISSION_DENIED, 403).
    PermissionDenied(String),
}

/// Decides whether a request may go on.
pub trait Gate: Send + Sync + 'static {
    fn check(&self, req: &http::request::Parts) -> Result<(), Denial>;
}

/// How a listener's requests map to [`Access`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Http,
}

/// Role checks on the public listeners. Without tokens, everything is allowed.
#[derive(Debug, Clone)]
pub struct ApiGate {
    pub tokens: Option<ApiTokens>,
    pub protocol: Protocol,
}

/// The bearer credential of a request, if it has one.
fn bearer(req: &http::request::Parts) -> Option<&str> {
    bearer_token(req.headers.get(http::header::AUTHORIZATION)?.to_str().ok()?)
}

/// The token of an `authorization` value `Bearer <token>` (the scheme in any case).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether the credential is a completion token (checked by the handler, not here).
pub fn is_completion_token(token: &str) -> bool {
    token.starts_with("vct1.")
}

impl Gate for ApiGate {
    fn check(&self, req: &http::request::Parts) -> Result<(), Denial> {
        let Some(tokens) = &self.tokens else { return Ok(()) };
        let path = req.uri.path();
        let access = match self.protocol {
            Protocol::Grpc => grpc_access(path),
            Protocol::Http => http_access(&req.method, path),
        };
        let needed = match access {
            Access::Open => return Ok(()),
            Access::Settle if bearer(req).is_some_and(is_completion_token) => return Ok(()),
            Access::Settle => Role::Writer,
            Access::Role(role) => role,
        };
        let Some(token) = bearer(req) else {
            return Err(Denial::Unauthenticated(format!(
                "{path} needs {} API token (`authorization: Bearer <token>`)",
                needed.a()
            )));
        };
        let Some(grant) = tokens.grant(token) else {
            return Err(Denial::Unauthenticated("the API token is not known to this cluster".into()));
        };
        if grant.role < needed {
            return Err(Denial::PermissionDenied(format!(
                "{:?} is {}: {path} needs {}",
                grant.name,
                grant.role.a(),
                needed.a()
            )));
        }
        Ok(())
    }
}

/// A response body that can carry a refusal in its listener's protocol.
pub trait Refusal: Sized {
    fn refusal(d: Denial) -> http::Response<Self>;
}

impl Refusal for tonic::body::Body {
    fn refusal(d: Denial) -> http::Response<Self> {
        match d {
            Denial::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            Denial::PermissionDenied(m) => tonic::Status::permission_denied(m),
        }
        .into_http()
    }
}

impl Refusal for axum::body::Body {
    fn refusal(d: Denial) -> http::Response<Self> {
        let (status, code, message) = match d {
            Denial::Unauthenticated(m) => (http::StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", m),
            Denial::PermissionDenied(m) => (http::StatusCode::FORBIDDEN, "PERMISSION_DENIED", m),
        };
        let body = serde_json::json!({ "code": code, "message": message }).to_string();
        let mut response = http::Response::new(axum::body::Body::from(body));
        *response.status_mut() = status;
        response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        if status == http::StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Puts a [`Gate`] in front of a service.
#[derive(Clone)]
pub struct GateLayer {
    gate: Arc<dyn Gate>,
}

impl std::fmt::Debug for GateLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GateLayer")
    }
}

impl GateLayer {
    pub fn new(gate: impl Gate) -> GateLayer {
        GateLayer { gate: Arc::new(gate) }
    }
}

impl<S> tower_layer::Layer<S> for GateLayer {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated { inner, gate: self.gate.clone() }
    }
}

/// A service behind a [`Gate`].
#[derive(Clone)]
pub struct Gated<S> {
    inner: S,
    gate: Arc<dyn Gate>,
}

impl<S> std::fmt::Debug for Gated<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gated")
    }
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for Gated<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Refusal + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        match self.gate.check(&parts) {
            Ok(()) => Box::pin(self.inner.call(http::Request::from_parts(parts, body))),
            Err(denial) => {
                tracing::debug!(path = parts.uri.path(), ?denial, "request refused");
                Box::pin(std::future::ready(Ok(RB::refusal(denial))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, path: &str, auth: Option<&str>) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(path);
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn gate(dir: &Path, protocol: Protocol) -> ApiGate {
        let path = dir.join("tokens");
        std::fs::write(
            &path,
            "# role name token\nadmin ops aaaaaaaaaaaaaaaa1\nwriter app wwwwwwwwwwwwwwww1\nreader dash rrrrrrrrrrrrrrrr1\n",
        )
        .expect("write");
        ApiGate { tokens: Some(ApiTokens::from_file(&path).expect("tokens")), protocol }
    }

    #[test]
    fn roles_allow_what_they_should_and_refusals_never_quote_the_token() {
        let dir = tempfile::tempdir().expect("dir");
        let g = gate(dir.path(), Protocol::Grpc);
        let call = |path: &str, auth: Option<&str>| g.check(&parts("POST", path, auth));
        assert_eq!(call("/grpc.health.v1.Health/Check", None), Ok(()));
        assert!(matches!(call("/vow.v1.Promises/Get", None), Err(Denial::Unauthenticated(_))));
        assert!(matches!(
            call("/vow.v1.Promises/Get", Some("Bearer nope-nope-nope-nope")),
            Err(Denial::Unauthenticated(_))
        ));
        assert_eq!(call("/vow.v1.Promises/Get", Some("Bearer rrrrrrrrrrrrrrrr1")), Ok(()));
        assert_eq!(call("/vow.v1.Cluster/ShardMap", Some("bearer rrrrrrrrrrrrrrrr1")), Ok(()));
        let refused = call("/vow.v1.Promises/Create", Some("Bearer rrrrrrrrrrrrrrrr1"));
        let Err(Denial::PermissionDenied(m)) = refused else { panic!("{refused:?}") };
        assert!(m.contains("\"dash\" is a reader") && !m.contains("rrrr"), "{m}");
        assert_eq!(call("/vow.v1.Promises/Create", Some("Bearer wwwwwwwwwwwwwwww1")), Ok(()));
        assert!(matches!(
            call("/vow.v1.Cluster/AddNode", Some("Bearer wwwwwwwwwwwwwwww1")),
            Err(Denial::PermissionDenied(_))
        ));
        assert_eq!(call("/vow.v1.Cluster/AddNode", Some("Bearer aaaaaaaaaaaaaaaa1")), Ok(()));
        // A completion token goes on to the handler, for settles only.
        assert_eq!(call("/vow.v1.Promises/Resolve", Some("Bearer vct1.x.y")), Ok(()));
        assert!(matches!(call("/vow.v1.Promises/Create", Some("Bearer vct1.x.y")), Err(Denial::Unauthenticated(_))));
        assert!(matches!(
            call("/vow.v1.Promises/Resolve", Some("Bearer rrrrrrrrrrrrrrrr1")),
            Err(Denial::PermissionDenied(_))
        ));
        assert!(matches!(
            call("/vow.v1.Promises/NewThing", Some("Bearer wwwwwwwwwwwwwwww1")),
            Err(Denial::PermissionDenied(_))
        ));

        let h = gate(dir.path(), Protocol::Http);
        assert_eq!(h.check(&parts("GET", "/metrics", None)), Ok(()));
        assert_eq!(h.check(&parts("GET", "/v1/promises/a", Some("Bearer rrrrrrrrrrrrrrrr1"))), Ok(()));
        assert!(h.check(&parts("POST", "/v1/promises", Some("Bearer rrrrrrrrrrrrrrrr1"))).is_err());
        assert_eq!(h.check(&parts("POST", "/v1/promises/a/resolve", Some("Bearer vct1.a.b"))), Ok(()));
        assert!(h.check(&parts("DELETE", "/v1/promises/a", Some("Bearer wwwwwwwwwwwwwwww1"))).is_err());
    }

    #[test]
    fn a_bad_token_file_is_explained_without_quoting_tokens() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("tokens");
        for (text, expect) in [
            ("root ops aaaaaaaaaaaaaaaa1\n", "role must be"),
            ("admin ops short\n", "shorter than 16"),
            ("admin ops\n", "expected `<role> <name> <token>`"),
            ("admin a aaaaaaaaaaaaaaaa1\nreader b aaaaaaaaaaaaaaaa1\n", "listed twice"),
            ("# nothing\n", "lists no tokens"),
            ("admin a vct1.aaaaaaaaaaaaaaaa\n", "cannot start with `vct1.`"),
        ] {
            std::fs::write(&path, text).expect("write");
            let err = format!("{:#}", ApiTokens::from_file(&path).expect_err(text));
            assert!(err.contains(expect), "{text:?}: {err}");
            assert!(!err.contains("aaaaaaaa"), "{err}");
        }
    }
}
