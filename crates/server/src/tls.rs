//! A node's TLS: the configurations of its three listeners and of its connections to peers,
//! built from PEM files and rebuilt when they change (`vow_client::tls::Reloading`), and the
//! identity a peer's certificate proves.
//!
//! One cluster CA signs every node certificate. The peer listener requires a client
//! certificate of that CA, and peers verify each other's server certificate against it by the
//! address they dialled; whether the identity is a *member* is checked per request by the peer
//! gate (`api.rs`), because membership changes while connections live. The public gRPC and HTTP
//! listeners present the same node certificate; they ask for a client certificate only when
//! `--tls-client-ca` is set.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use vow_client::tls::{ClientTls, ClientTlsFiles, Reloading, provider, read_certs, read_key, read_roots};

/// Where a node's TLS material lives (`--tls-cert`, `--tls-key`, `--tls-ca`, `--tls-client-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This node's certificate chain, leaf first: presented on every listener and to peers.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The cluster CA: peers' certificates must chain to it.
    pub ca: PathBuf,
    /// CA of client certificates on the public listeners; with it, a client may present one.
    pub client_ca: Option<PathBuf>,
}

/// The URI a node certificate carries to name its node: `vow://node/<id>`.
pub const NODE_URI_PREFIX: &str = "vow://node/";

/// Everything TLS on one node.
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// The peer listener: node certificate, client certificate of the cluster CA required.
    pub peer_server: Arc<Reloading<rustls::ServerConfig>>,
    /// The public gRPC listener (ALPN h2).
    pub grpc_server: Arc<Reloading<rustls::ServerConfig>>,
    /// The HTTP listener (ALPN http/1.1).
    pub http_server: Arc<Reloading<rustls::ServerConfig>>,
    /// Connections to peers: the cluster CA as roots, the node certificate as client certificate.
    pub peer_client: ClientTls,
}

impl NodeTls {
    /// Loads every configuration now; an error names the file at fault.
    pub fn load(files: &TlsFiles) -> anyhow::Result<NodeTls> {
        let server = |what: &'static str, alpn: &'static [&'static [u8]], client_ca: Option<(PathBuf, bool)>| {
            let f = files.clone();
            let mut paths = vec![f.cert.clone(), f.key.clone()];
            if let Some((ca, _)) = &client_ca {
                paths.push(ca.clone());
            }
            Reloading::new(what, paths, move || server_config(&f, alpn, client_ca.as_ref())).map(Arc::new)
        };
        let peer_server =
            server("peer listener TLS", &[b"h2"], Some((files.ca.clone(), true))).map_err(anyhow::Error::msg)?;
        let public_ca = files.client_ca.clone().map(|ca| (ca, false));
        let grpc_server = server("gRPC listener TLS", &[b"h2"], public_ca.clone()).map_err(anyhow::Error::msg)?;
        let http_server = server("HTTP listener TLS", &[b"http/1.1"], public_ca).map_err(anyhow::Error::msg)?;
        let peer_client = ClientTls::from_files(
            &ClientTlsFiles { ca: files.ca.clone(), cert_and_key: Some((files.cert.clone(), files.key.clone())) },
            &[b"h2"],
        )
        .map_err(anyhow::Error::msg)?;
        Ok(NodeTls { peer_server, grpc_server, http_server, peer_client })
    }
}

/// A server configuration presenting the node certificate; `client_ca` = (CA file, required).
fn server_config(
    f: &TlsFiles,
    alpn: &[&[u8]],
    client_ca: Option<&(PathBuf, bool)>,
) -> Result<rustls::ServerConfig, String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some((ca, required)) => {
            let roots = Arc::new(read_roots(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let verifier = if *required { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| format!("{}: {e}", ca.display()))?)
        }
    };
    let mut config = builder
        .with_single_cert(read_certs(&f.cert)?, read_key(&f.key)?)
        .map_err(|e| format!("{} and {} do not make a usable pair: {e}", f.cert.display(), f.key.display()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// What a verified peer certificate says about who holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Node ids named by `vow://node/<id>` URIs.
    pub node_ids: Vec<u64>,
    /// DNS names (wildcards as written, e.g. `*.vow.default.svc`) and IP addresses.
    pub names: Vec<String>,
}

impl Identity {
    /// Reads the subject alternative names of a certificate the handshake already verified.
    pub fn of(cert: &CertificateDer<'_>) -> Identity {
        use x509_parser::extensions::GeneralName;
        let mut id = Identity::default();
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else { return id };
        let Ok(Some(san)) = parsed.subject_alternative_name() else { return id };
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => {
                    if let Some(n) = uri.strip_prefix(NODE_URI_PREFIX).and_then(|n| n.parse().ok()) {
                        id.node_ids.push(n);
                    }
                }
                GeneralName::DNSName(dns) => id.names.push(dns.to_ascii_lowercase()),
                GeneralName::IPAddress(ip) => {
                    let addr = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                        16 => <[u8; 16]>::try_from(*ip).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                        _ => None,
                    };
                    id.names.extend(addr);
                }
                _ => {}
            }
        }
        id
    }

    /// Whether this identity is node `id`, reachable on `peer_addr` (`host:port`): the
    /// certificate names the node id, or (for certificates without node URIs, such as one
    /// wildcard certificate per StatefulSet) a DNS name or IP address matching the host.
    pub fn is(&self, id: u64, peer_addr: &str) -> bool {
        if !self.node_ids.is_empty() {
            return self.node_ids.contains(&id);
        }
        let host = host_of(peer_addr).to_ascii_lowercase();
        self.names.iter().any(|n| name_matches(n, &host))
    }
}

/// The host of `host:port` (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A DNS name with an optional leading `*.` wildcard for one label, as in certificates.
fn name_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_match_by_node_uri_first_then_by_host() {
        let by_uri = Identity { node_ids: vec![3], names: vec!["127.0.0.1".into()] };
        assert!(by_uri.is(3, "127.0.0.1:7103"));
        assert!(!by_uri.is(4, "127.0.0.1:7104"), "a node URI names exactly one node, whatever the host");
        let wildcard = Identity { node_ids: vec![], names: vec!["*.vow.default.svc".into()] };
        assert!(wildcard.is(0, "vow-0.vow.default.svc:7101"));
        assert!(!wildcard.is(0, "vow.default.svc:7101"));
        assert!(!wildcard.is(0, "a.b.vow.default.svc:7101"));
        let ip = Identity { node_ids: vec![], names: vec!["::1".into()] };
        assert!(ip.is(1, "[::1]:7101"));
        assert!(!Identity::default().is(1, "a:1"));
    }
}
