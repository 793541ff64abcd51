//! Security (issue #17) against real `vowd` processes started by `vow dev up --tls`: TLS on every
//! listener, mutual TLS on the peer port with member certificates, API tokens with roles on the
//! public gRPC and HTTP ports. Every refusal is checked to have had no effect.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tonic::Code;
use vow_api::raft::RaftRequest;
use vow_api::raft::raft_client::RaftClient;
use vow_api::v1 as pb;
use vow_api::v1::promises_client::PromisesClient;
use vow_client::tls::{ClientTls, ClientTlsFiles, Token};
use vow_client::transport::{H2Channel, Security};
use vow_client::{Client, Error, Options, Settle};
use vow_tests::{DevCluster, value, vow, vow_with};

fn tls_to(ca: &Path, cert: Option<(&Path, &Path)>) -> anyhow::Result<ClientTls> {
    let files = ClientTlsFiles { ca: ca.to_owned(), cert_and_key: cert.map(|(c, k)| (c.to_owned(), k.to_owned())) };
    ClientTls::from_files(&files, &[b"h2"]).map_err(anyhow::Error::msg)
}

/// A raw channel to `addr` with exactly this TLS and token, no retries.
fn channel(addr: &str, tls: Option<ClientTls>, token: Option<&str>) -> anyhow::Result<H2Channel> {
    H2Channel::with_security(addr, Security { tls, token: token.map(Token::new) }).map_err(anyhow::Error::msg)
}

fn create(id: &str) -> pb::CreateRequest {
    pb::CreateRequest { id: id.into(), idempotency_key: format!("k-{id}"), ..Default::default() }
}

/// `curl` over TLS with the cluster CA; returns (status, body).
fn curl(ca: &Path, args: &[&str]) -> anyhow::Result<(u16, String)> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(ca)
        .args(["-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()?;
    ensure!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let (body, code) = text.rsplit_once('\n').context("no status")?;
    Ok((code.trim().parse()?, body.to_owned()))
}

/// Roles on both public ports: no token or an unknown one is UNAUTHENTICATED (401), a role
/// short of the call PERMISSION_DENIED (403), and none of them has an effect; the right role
/// goes through, a completion token settles its promise without an API token, and requests
/// sent to any node reach every shard's leader over the mutual-TLS peer port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_decide_every_call_with_no_effect_when_refused() -> anyhow::Result<()> {
    let cluster = DevCluster::up_with(3, &[], &["--tls"])?;
    cluster.leader().await?;
    let admin = cluster.client();
    let addr = cluster.node(1).grpc.clone();
    let tls = tls_to(&cluster.ca(), None)?;
    let (reader, writer) = (cluster.token("reader")?, cluster.token("writer")?);

    // Ids on every shard, all through node 1: the routed ones cross the peer port.
    for i in 0..24 {
        let id = format!("sec-{i}");
        let mut w = PromisesClient::new(channel(&addr, Some(tls.clone()), Some(&writer))?);
        w.create(create(&id)).await.with_context(|| format!("writer creates {id}"))?;
        w.resolve(pb::SettleRequest { id: id.clone(), idempotency_key: format!("r-{id}"), ..Default::default() })
            .await
            .with_context(|| format!("writer resolves {id}"))?;
    }

    for (token, code, what) in [
        (None, Code::Unauthenticated, "no token"),
        (Some("not-a-token-of-this-cluster"), Code::Unauthenticated, "an unknown token"),
        (Some(reader.as_str()), Code::PermissionDenied, "a reader token"),
    ] {
        let mut c = PromisesClient::new(channel(&addr, Some(tls.clone()), token)?);
        let err = c.create(create("refused")).await.expect_err(what);
        assert_eq!(err.code(), code, "create with {what}: {err:?}");
        assert!(!err.message().contains(&writer) && !err.message().contains(&reader), "{err:?}");
        let err = c
            .resolve(pb::SettleRequest { id: "sec-0".into(), idempotency_key: "again".into(), ..Default::default() })
            .await
            .expect_err(what);
        assert_eq!(err.code(), code, "resolve with {what}: {err:?}");
    }
    assert!(matches!(admin.get("refused").await, Err(Error::NotFound(_))), "a refused create made nothing");

    // A reader reads, and is refused membership; a writer is refused membership too.
    let r = Client::with_options(&[addr.as_str()], cluster.options_as("reader"))?;
    assert_eq!(r.get("sec-3").await?.state, pb::State::Resolved as i32);
    assert!(matches!(r.remove_node(3).await, Err(Error::PermissionDenied(_))), "reader removes a node");
    let w = Client::with_options(&[addr.as_str()], cluster.options_as("writer"))?;
    assert!(matches!(w.transfer_leader(2).await, Err(Error::PermissionDenied(_))), "writer moves leaders");
    let status = admin.status().await?;
    assert!(status.shards.iter().all(|s| s.voters.len() == 3), "{status:?}");

    // Plain text to a TLS port gets nowhere.
    let mut plain = PromisesClient::new(channel(&addr, None, Some(&writer))?);
    assert!(plain.get(pb::GetRequest { id: "sec-0".into(), ..Default::default() }).await.is_err());

    // A completion token settles its promise with no API token at all (an outside system).
    let made = w
        .create(pb::CreateRequest { id: "sec-task".into(), completion_token_ttl_ms: 600_000, ..Default::default() })
        .await?;
    let token = made.completion_token.clone();
    ensure!(token.starts_with("vct1."), "no completion token: {made:?}");
    let outsider = Client::with_options(&[addr.as_str()], Options { tls: Some(tls.clone()), ..Options::default() })?;
    assert!(matches!(outsider.get("sec-task").await, Err(Error::Unauthenticated(_))));
    outsider.settle_with_token(Settle::Resolve, "sec-task", value("done"), None, Some(&token)).await?;
    assert_eq!(admin.get("sec-task").await?.state, pb::State::Resolved as i32);

    // The HTTP port: TLS, the same roles, probes open.
    let http = format!("https://{}", cluster.node(2).http);
    let ca = cluster.ca();
    assert_eq!(curl(&ca, &[&format!("{http}/livez")])?.0, 200);
    let body = r#"{"id":"sec-http","idempotencyKey":"h1"}"#;
    let post = |auth: &str| -> anyhow::Result<(u16, String)> {
        let mut args = vec!["-X", "POST", "-H", "content-type: application/json", "--data", body];
        let header = format!("authorization: Bearer {auth}");
        if !auth.is_empty() {
            args.extend(["-H", header.as_str()]);
        }
        let url = format!("{http}/v1/promises");
        args.push(url.as_str());
        curl(&ca, &args)
    };
    let (code, text) = post("")?;
    assert_eq!(code, 401, "{text}");
    assert!(text.contains("UNAUTHENTICATED"), "{text}");
    assert_eq!(post(&reader)?.0, 403);
    assert!(matches!(admin.get("sec-http").await, Err(Error::NotFound(_))));
    assert_eq!(post(&writer)?.0, 201);
    let (code, text) =
        curl(&ca, &["-H", &format!("authorization: Bearer {reader}"), &format!("{http}/v1/promises/sec-http")])?;
    assert_eq!(code, 200, "{text}");
    Ok(())
}

/// The peer port serves Raft and routing only, and only to a member's certificate of the
/// cluster CA: no certificate or another CA's fails the handshake, a CA certificate naming a
/// non-member (or no node) is PERMISSION_DENIED, and a member's certificate gets as far as the
/// Raft service. The public port does not serve Raft at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_accepts_only_members() -> anyhow::Result<()> {
    let cluster = DevCluster::up_with(3, &[], &["--tls"])?;
    cluster.leader().await?;
    let dir = cluster.dir.path();
    let t = dir.join("tls");
    let peer = cluster.node(1).peer.clone();
    let ca = cluster.ca();
    let raft_vote = |ch: H2Channel| async move {
        let req = RaftRequest {
            shard_id: 0,
            target_node_id: 1,
            cluster_name: "vow".into(),
            payload: vec![0xff; 8].into(),
            ..Default::default()
        };
        RaftClient::new(ch).vote(req).await
    };

    // No client certificate: the handshake fails, nothing is served.
    let err = raft_vote(channel(&peer, Some(tls_to(&ca, None)?), None)?).await.expect_err("no client cert");
    assert!(matches!(err.code(), Code::Unavailable | Code::Unknown), "{err:?}");

    // Another CA's node certificate: the handshake fails.
    let other = dir.join("other-ca");
    run_vow(&["tls", "ca", "--dir", &other.display().to_string()])?;
    let forged = other.join("node-2.pem");
    make_cert(&other, &forged, &["--node-id", "2", "--ip", "127.0.0.1"])?;
    let tls = tls_to(&ca, Some((&forged, &other.join("node-2-key.pem"))))?;
    let err = raft_vote(channel(&peer, Some(tls), None)?).await.expect_err("another CA");
    assert!(matches!(err.code(), Code::Unavailable | Code::Unknown), "{err:?}");

    // The cluster CA, but not a member: node 9, and a client certificate naming no node.
    let stranger = t.join("node-9.pem");
    make_cert(&t, &stranger, &["--node-id", "9", "--ip", "127.0.0.1"])?;
    for (cert, key) in [(stranger.clone(), t.join("node-9-key.pem")), (t.join("client.pem"), t.join("client-key.pem"))]
    {
        let tls = tls_to(&ca, Some((&cert, &key)))?;
        let err = raft_vote(channel(&peer, Some(tls.clone()), None)?).await.expect_err("non-member");
        assert_eq!(err.code(), Code::PermissionDenied, "{}: {err:?}", cert.display());
        // Nor may it add another node, or itself through a public API it has no token for.
        let mut cluster_api = vow_api::v1::cluster_client::ClusterClient::new(channel(&peer, Some(tls), None)?);
        let req = pb::AddNodeRequest {
            node_id: 5,
            grpc_addr: "127.0.0.1:1".into(),
            peer_addr: "127.0.0.1:2".into(),
            ..Default::default()
        };
        let err = cluster_api.add_node(req).await.expect_err("adding another node");
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    }

    // A member's certificate gets through the gate to the Raft service, which refuses the junk.
    let member = tls_to(&ca, Some((&t.join("node-2.pem"), &t.join("node-2-key.pem"))))?;
    let err = raft_vote(channel(&peer, Some(member.clone()), None)?).await.expect_err("junk payload");
    assert!(!matches!(err.code(), Code::PermissionDenied | Code::Unauthenticated), "{err:?}");
    // ... but not to the public services.
    let mut promises = PromisesClient::new(channel(&peer, Some(member), None)?);
    let err = promises.get(pb::GetRequest { id: "x".into(), ..Default::default() }).await.expect_err("public on peer");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // The public port does not serve Raft, whatever the token.
    let public = channel(&cluster.node(1).grpc, Some(tls_to(&ca, None)?), Some(&cluster.token("admin")?))?;
    let err = raft_vote(public).await.expect_err("raft on the public port");
    assert!(matches!(err.code(), Code::Unimplemented | Code::PermissionDenied), "{err:?}");

    let status = cluster.status().await?;
    assert!(status.shards.iter().all(|s| s.voters == vec![1, 2, 3] && s.learners.is_empty()), "{status:?}");
    Ok(())
}

/// A node joins a TLS cluster with its own certificate; then every node's certificate is
/// replaced while clients write, without an error, and new connections see the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_over_mtls_and_certificates_rotate_under_load() -> anyhow::Result<()> {
    let cluster = DevCluster::up_with(3, &[], &["--tls"])?;
    cluster.leader().await?;
    let mut joiner = cluster.joiner(4)?;
    joiner.start(&cluster.node(2).peer)?;
    cluster
        .wait_for("node 4 a voter of every shard", Duration::from_secs(60), |s| {
            s.shards.iter().all(|sh| sh.voters.contains(&4)).then_some(())
        })
        .await
        .with_context(|| joiner.log_tail(30))?;

    // Load: creates and resolves through every node until told to stop.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let pairs = std::sync::Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for w in 0..4 {
        let client = cluster.client();
        let (stop, pairs) = (stop.clone(), pairs.clone());
        load.push(tokio::spawn(async move {
            let mut done = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("rot-{w}-{done}");
                let req = pb::CreateRequest { id: id.clone(), param: Some(value("x")), ..Default::default() };
                client.create(req).await.with_context(|| format!("create {id}"))?;
                client.resolve(&id, value("y"), None).await.with_context(|| format!("resolve {id}"))?;
                done += 1;
                pairs.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(done)
        }));
    }
    // Some load before the rotation, and as much again after it is seen.
    let load_reaches = |n: u64| {
        let pairs = pairs.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while pairs.load(Ordering::Relaxed) < n {
                ensure!(Instant::now() < deadline, "the load stopped short of {n} create-resolve pairs");
                tokio::time::sleep(Duration::from_millis(20)).await; // poll the load's progress
            }
            anyhow::Ok(())
        }
    };
    load_reaches(20).await?;
    let t = cluster.dir.path().join("tls");
    let before = served_cert(&cluster.ca(), &cluster.node(1).grpc).await?;
    for id in 1..=3u64 {
        make_cert(
            &t,
            &t.join(format!("node-{id}.pem")),
            &["--node-id", &id.to_string(), "--ip", "127.0.0.1", "--dns", "localhost"],
        )?;
    }
    // Reloads are looked for once a second; give new connections time to see them, under load.
    let deadline = Instant::now() + Duration::from_secs(10);
    let rotated = vow_client::tls::read_certs(&t.join("node-1.pem")).map_err(anyhow::Error::msg)?;
    loop {
        let now = served_cert(&cluster.ca(), &cluster.node(1).grpc).await?;
        if now == rotated[0].as_ref() {
            break;
        }
        ensure!(now == before, "node 1 serves a certificate that is neither the old nor the new one");
        if Instant::now() > deadline {
            bail!("node 1 still serves its old certificate 10 s after the rotation");
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // poll for the reload
    }
    load_reaches(pairs.load(Ordering::Relaxed) + 20).await?;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for l in load {
        total += l.await??;
    }
    ensure!(total > 20, "only {total} create-resolve pairs under load");
    // Every shard still has a leader: the nodes talk to each other with the rotated certificates.
    // (Waited for: the leader balancer may be moving one to the new node at this moment.)
    cluster
        .wait_for("every shard to have a leader after the rotation", Duration::from_secs(10), |s| {
            s.shards.iter().all(|sh| sh.leader_id != 0).then_some(())
        })
        .await?;
    Ok(())
}

fn run_vow(args: &[&str]) -> anyhow::Result<()> {
    let out = vow(args);
    ensure!(out.status.success(), "vow {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn make_cert(ca_dir: &Path, out: &Path, extra: &[&str]) -> anyhow::Result<()> {
    let (ca_dir, out) = (ca_dir.display().to_string(), out.display().to_string());
    let mut args = vec!["tls", "cert", "--ca-dir", ca_dir.as_str(), "--out", out.as_str()];
    args.extend_from_slice(extra);
    run_vow(&args)
}

/// The DER of the certificate `addr` presents to a new connection.
async fn served_cert(ca: &Path, addr: &str) -> anyhow::Result<Vec<u8>> {
    let tls = tls_to(ca, None)?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let conn = tls.connect("127.0.0.1", tcp).await?;
    let certs = conn.peer_certificates().context("no certificate")?;
    Ok(certs.first().context("empty chain")?.as_ref().to_vec())
}

/// The command line over TLS: `vow dev up --tls` prints what a client needs, and with it `vow`
/// works; without the token it exits with the permission code.
#[test]
fn the_command_line_reaches_a_tls_cluster_with_the_printed_environment() -> anyhow::Result<()> {
    let cluster = DevCluster::up_with(1, &[], &["--tls"])?;
    let ep = cluster.node(1).grpc.clone();
    let mut env = cluster.cli_env();
    env.push(("VOW_ENDPOINTS".into(), ep.clone()));
    let out = vow_with(&["create", "cli-tls", "--data", "v"], &env);
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let without: Vec<(String, String)> = env.iter().filter(|(k, _)| k != "VOW_TOKEN").cloned().collect();
    let out = vow_with(&["get", "cli-tls"], &without);
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
