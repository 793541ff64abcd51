//! `vow tls ca|cert`: a cluster CA and the certificates it signs, for `vow dev up --tls`, the
//! tests and operators without a PKI of their own (docs/security.md).
//!
//! A node certificate names its node with the URI `vow://node/<id>` (what the peer port checks
//! against the members) and its DNS names and IP addresses (what a client dialling it checks),
//! and may serve and authenticate as a client. Keys are ECDSA P-256, written readable by their
//! owner only.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Debug, clap::Subcommand)]
pub enum TlsCommand {
    /// Make a cluster CA: DIR/ca.pem (give it to every node and client) and DIR/ca-key.pem
    /// (keep it safe; only `vow tls cert` needs it).
    Ca {
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u64,
    },
    /// Make a certificate signed by the CA in --ca-dir: for a node (--node-id) or a client.
    Cert {
        #[arg(long)]
        ca_dir: PathBuf,
        /// Where to write the certificate (PEM); the key goes beside it as NAME-key.pem.
        #[arg(long)]
        out: PathBuf,
        /// The node it is for (`vow://node/<id>`); none for a client certificate.
        #[arg(long)]
        node_id: Option<u64>,
        /// DNS name the holder is reached by (repeatable; wildcards such as *.vow.ns.svc allowed).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// IP address the holder is reached by (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Common name (default: node-<id>, or client).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

pub fn run(cmd: TlsCommand) -> anyhow::Result<()> {
    match cmd {
        TlsCommand::Ca { dir, days } => {
            make_ca(&dir, days)?;
            eprintln!("wrote {} and {}", dir.join("ca.pem").display(), dir.join("ca-key.pem").display());
        }
        TlsCommand::Cert { ca_dir, out, node_id, dns, ips, name, days } => {
            let key = make_cert(&ca_dir, &out, &Subject { node_id, dns, ips, name }, days)?;
            eprintln!("wrote {} and {}", out.display(), key.display());
        }
    }
    Ok(())
}

/// Who a certificate is for.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    pub node_id: Option<u64>,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub name: Option<String>,
}

fn validity(params: &mut CertificateParams, days: u64) {
    let now = std::time::SystemTime::now();
    // An hour of slack for clocks that run behind.
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(days.max(1) * 86_400)).into();
}

/// Writes a private file (mode 0600), replacing it atomically.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Writes a file, replacing it atomically (a node reloading it never reads half of it).
fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Makes `dir/ca.pem` and `dir/ca-key.pem`.
pub fn make_ca(dir: &Path, days: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, "vow cluster CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let ca = CertifiedIssuer::self_signed(params, key)?;
    write_private(&dir.join("ca-key.pem"), &ca.key().serialize_pem())?;
    write_public(&dir.join("ca.pem"), &ca.pem())?;
    Ok(())
}

/// Makes a certificate for `subject` signed by the CA in `ca_dir`, at `out` with its key at
/// `out`'s stem + `-key.pem`; returns the key's path.
pub fn make_cert(ca_dir: &Path, out: &Path, subject: &Subject, days: u64) -> anyhow::Result<PathBuf> {
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem"))
        .with_context(|| format!("reading {}", ca_dir.join("ca.pem").display()))?;
    let ca_key = std::fs::read_to_string(ca_dir.join("ca-key.pem"))
        .with_context(|| format!("reading {}", ca_dir.join("ca-key.pem").display()))?;
    let ca_key = KeyPair::from_pem(&ca_key).context("the CA key is not a usable private key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("the CA certificate is not usable")?;

    let mut params = CertificateParams::new(subject.dns.clone())?;
    for ip in &subject.ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    if let Some(id) = subject.node_id {
        params.subject_alt_names.push(SanType::URI(format!("vow://node/{id}").try_into()?));
    }
    let name = subject.name.clone().unwrap_or_else(|| match subject.node_id {
        Some(id) => format!("node-{id}"),
        None => "client".into(),
    });
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("cert");
    let key_path = out.with_file_name(format!("{stem}-key.pem"));
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    // The key first: a node watching both files never pairs a new certificate with an old key
    // for longer than one reload check.
    write_private(&key_path, &key.serialize_pem())?;
    write_public(out, &cert.pem())?;
    Ok(key_path)
}
