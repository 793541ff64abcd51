//! TLS for clients of vow and for vowd's own connections: PEM files read into rustls
//! configurations that follow their files (a rotated certificate is used from the next
//! connection on, without a restart), the stream type a connection is on either side, and the
//! API token a client presents.
//!
//! rustls runs with the `ring` provider everywhere, chosen explicitly so that no process depends
//! on which provider a dependency happened to enable.

use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How often a [`Reloading`] value looks at its files' modification times.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The crypto provider of every TLS configuration vow builds.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A value built from files, rebuilt when any of them changes. [`Reloading::get`] looks at the
/// files at most once per [`RELOAD_CHECK`]; a rebuild that fails (a half-written file, a key
/// that does not match its certificate) keeps the last good value and is logged once per change.
pub struct Reloading<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    build: Box<dyn Fn() -> Result<T, String> + Send + Sync>,
    state: Mutex<ReloadState<T>>,
}

struct ReloadState<T> {
    checked: Instant,
    stamps: Vec<Option<SystemTime>>,
    value: Arc<T>,
}

impl<T> fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading").field("what", &self.what).field("paths", &self.paths).finish()
    }
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths.iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
}

impl<T> Reloading<T> {
    /// Builds the value once now (an error here is the caller's to report: a node must not
    /// start with TLS it cannot load), then follows `paths`.
    pub fn new(
        what: &'static str,
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Reloading<T>, String> {
        let stamps = stamps(&paths);
        let value = Arc::new(build().map_err(|e| format!("{what}: {e}"))?);
        Ok(Reloading {
            what,
            paths,
            build: Box::new(build),
            state: Mutex::new(ReloadState { checked: Instant::now(), stamps, value }),
        })
    }

    /// Makes the next [`Reloading::get`] look at the files whatever the time since the last look.
    pub fn look_now(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.checked = Instant::now().checked_sub(RELOAD_CHECK).unwrap_or(state.checked);
        state.stamps.iter_mut().for_each(|s| *s = None);
    }

    /// The current value, rebuilt first if a file changed since the last look.
    pub fn get(&self) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let now = stamps(&self.paths);
            if now != state.stamps {
                state.stamps = now;
                match (self.build)() {
                    Ok(v) => {
                        state.value = Arc::new(v);
                        tracing::info!(what = self.what, "reloaded from its files");
                    }
                    Err(e) => {
                        tracing::warn!(what = self.what, error = %e, "reloading failed; keeping the previous one")
                    }
                }
            }
        }
        state.value.clone()
    }
}

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("reading certificates from {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("reading certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file (PKCS#8, PKCS#1 or SEC1). The error never quotes the file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("reading the private key in {}: {e}", path.display()))
}

/// The trust roots in a CA file.
pub fn read_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| format!("{} is not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Files a client's TLS comes from: the CA that signed the servers' certificates and, for
/// mutual TLS, the client's own certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    pub cert_and_key: Option<(PathBuf, PathBuf)>,
}

/// A client TLS configuration that follows its files. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<Reloading<rustls::ClientConfig>>,
}

impl ClientTls {
    /// Loads `files` now (failing with a message that names the file) and follows them. `alpn`
    /// is the protocol list offered, e.g. `[b"h2"]` for gRPC.
    pub fn from_files(files: &ClientTlsFiles, alpn: &[&[u8]]) -> Result<ClientTls, String> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let mut paths = vec![files.ca.clone()];
        if let Some((c, k)) = &files.cert_and_key {
            paths.extend([c.clone(), k.clone()]);
        }
        let files = files.clone();
        let config = Reloading::new("client TLS", paths, move || {
            let builder = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(read_roots(&files.ca)?);
            let mut config = match &files.cert_and_key {
                Some((cert, key)) => builder
                    .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
                    .map_err(|e| format!("{} and {} do not make a usable pair: {e}", cert.display(), key.display()))?,
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = alpn.clone();
            Ok(config)
        })?;
        Ok(ClientTls { config: Arc::new(config) })
    }

    /// Makes the TLS handshake on `tcp` with the server at `host` (its certificate must name
    /// it: a DNS name or an IP address).
    pub async fn connect(&self, host: &str, tcp: TcpStream) -> std::io::Result<MaybeTls> {
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("server name {host:?}: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(self.config.get());
        let tls = connector.connect(name, tcp).await?;
        Ok(MaybeTls::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
    }
}

/// An API token (`authorization: Bearer`). Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl Token {
    pub fn new(token: impl Into<String>) -> Token {
        Token(token.into().trim().into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A connection in plain text or under TLS, either side.
#[derive(Debug)]
pub enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl MaybeTls {
    /// The peer's certificate chain, leaf first, when the connection is TLS and the peer sent one.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            MaybeTls::Plain(_) => None,
            MaybeTls::Tls(t) => t.get_ref().1.peer_certificates(),
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(t) => t,
            MaybeTls::Tls(t) => t.get_ref().0,
        }
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }
}
