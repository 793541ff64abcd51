//! Watch (issue #16): settlements as they happen across eight shards, resumed after a
//! disconnect — on another node, after the first one was killed — without missing one. Real
//! `vowd` processes; the raw gRPC stream (the contract), the Rust SDK and the CLI.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use vow_api::v1 as pb;
use vow_api::v1::promises_client::PromisesClient;
use vow_client::Client;
use vow_tests::{DevCluster, create_req, value};

async fn open(addr: &str, req: pb::WatchRequest) -> anyhow::Result<tonic::Streaming<pb::WatchEvent>> {
    let mut c = PromisesClient::connect(format!("http://{addr}")).await?;
    Ok(c.watch(req).await?.into_inner())
}

/// Reads events until `done` says stop, or fails after 60 s.
async fn read_until(
    stream: &mut tonic::Streaming<pb::WatchEvent>,
    seen: &mut BTreeMap<String, pb::Promise>,
    token: &mut String,
    mut done: impl FnMut(&BTreeMap<String, pb::Promise>) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        let event =
            tokio::time::timeout(left, stream.message()).await.context("watch stalled")??.context("stream ended")?;
        ensure!(!event.resume_token.is_empty(), "every event carries a token");
        *token = event.resume_token;
        if let Some(p) = event.promise {
            ensure!(p.state != pb::State::Pending as i32, "only settlements: {p:?}");
            if let Some(before) = seen.insert(p.id.clone(), p.clone()) {
                ensure!(before == p, "a repeat is the same record: {before:?} vs {p:?}");
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_resumed_on_another_node_misses_no_settlement() -> anyhow::Result<()> {
    let cluster = DevCluster::up(3, &[])?;
    cluster.leader().await?;
    let client = cluster.client();
    let mut stream =
        open(&cluster.node(1).grpc, pb::WatchRequest { id_prefix: "w-".into(), ..Default::default() }).await?;
    let first = stream.message().await?.context("a first event")?;
    ensure!(first.promise.is_none() && !first.resume_token.is_empty(), "a checkpoint comes first: {first:?}");
    let mut token = first.resume_token;

    // Settlements on every shard, some of them timeouts (many in one log entry), and others the
    // prefix leaves out.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    let mut expected = BTreeSet::new();
    let settle_batch = |from: usize, to: usize| {
        let client = client.clone();
        async move {
            for n in from..to {
                let id = format!("w-{n}");
                client.create(create_req(&id, "")).await?;
                client.resolve(&id, value(&format!("v{n}")), None).await?;
                let other = format!("x-{n}");
                client.create(create_req(&other, "")).await?;
                client.resolve(&other, value("x"), None).await?;
            }
            anyhow::Ok(())
        }
    };
    for n in 0..20 {
        let id = format!("w-timeout-{n}");
        client.create(pb::CreateRequest { id: id.clone(), deadline_ms: now + 1_500, ..Default::default() }).await?;
        expected.insert(id);
    }
    settle_batch(0, 40).await?;
    expected.extend((0..40).map(|n| format!("w-{n}")));

    let mut seen = BTreeMap::new();
    read_until(&mut stream, &mut seen, &mut token, |s| s.len() >= 30).await?;
    // Disconnect; more settle meanwhile; the node that served the watch dies.
    drop(stream);
    settle_batch(40, 80).await?;
    expected.extend((40..80).map(|n| format!("w-{n}")));
    cluster.kill9(1)?;
    settle_batch(80, 100).await?;
    expected.extend((80..100).map(|n| format!("w-{n}")));

    let mut stream = open(
        &cluster.node(2).grpc,
        pb::WatchRequest { id_prefix: "w-".into(), resume_token: token.clone(), ..Default::default() },
    )
    .await?;
    read_until(&mut stream, &mut seen, &mut token, |s| expected.iter().all(|id| s.contains_key(id))).await?;
    ensure!(seen.keys().all(|id| id.starts_with("w-")), "only the prefix");
    for n in 0..100 {
        let p = &seen[&format!("w-{n}")];
        ensure!(p.value.as_ref().map(|v| v.data.clone()) == Some(format!("v{n}").into_bytes()), "{p:?}");
    }
    for n in 0..20 {
        ensure!(seen[&format!("w-timeout-{n}")].state == pb::State::RejectedTimedout as i32);
    }

    // A token of another shard count, or garbage: INVALID_ARGUMENT.
    let mut c = PromisesClient::connect(format!("http://{}", cluster.node(3).grpc)).await?;
    for bad in ["w1.AAAAAQ", "nonsense"] {
        let err = c.watch(pb::WatchRequest { resume_token: bad.into(), ..Default::default() }).await.expect_err(bad);
        ensure!(err.code() == tonic::Code::InvalidArgument, "{err:?}");
    }
    Ok(())
}

/// The SDK's watch resumes by itself when its node dies and hands each settlement over once;
/// named ids already settled come first; the CLI prints one line per settlement.
#[tokio::test(flavor = "multi_thread")]
async fn the_sdk_and_cli_watch_through_a_node_loss() -> anyhow::Result<()> {
    let cluster = DevCluster::up(3, &[])?;
    cluster.leader().await?;
    let client = cluster.client();
    client.create(create_req("named-done", "")).await?;
    client.resolve("named-done", value("early"), None).await?;
    client.create(create_req("named-later", "")).await?;
    // The watch's client knows node 1 first: it is served there until node 1 dies.
    let endpoints = [1, 2, 3].map(|n| cluster.node(n).grpc.clone());
    let watcher = Client::connect(&endpoints)?;
    let mut named = watcher.watch(vec!["named-done".into(), "named-later".into()], "", None);
    let mut sdk = watcher.watch(vec![], "s-", None);
    // The first event of each is its checkpoint; read it so the watch is open before settling.
    ensure!(named.next().await?.promise.is_none());
    ensure!(sdk.next().await?.promise.is_none());
    let got = settled(&mut named).await?;
    ensure!(got.id == "named-done", "{got:?}");
    client.resolve("named-later", value("later"), None).await?;
    ensure!(settled(&mut named).await?.id == "named-later");

    for n in 0..20 {
        client.create(create_req(&format!("s-{n}"), "")).await?;
        client.resolve(&format!("s-{n}"), value("v"), None).await?;
    }
    let mut ids = BTreeSet::new();
    for _ in 0..10 {
        ids.insert(settled(&mut sdk).await?.id);
    }
    cluster.kill9(1)?;
    for n in 20..40 {
        client.create(create_req(&format!("s-{n}"), "")).await?;
        client.resolve(&format!("s-{n}"), value("v"), None).await?;
    }
    while ids.len() < 40 {
        let id = settled(&mut sdk).await?.id;
        ensure!(ids.insert(id.clone()), "{id} handed over twice");
    }

    // The CLI, three settlements, one JSON line each; from a token taken before they happen,
    // so the CLI cannot start too late to see them.
    let mut start = watcher.watch(vec![], "c-", None);
    ensure!(start.next().await?.promise.is_none());
    let from = start.resume_token().to_owned();
    let endpoints = format!("{},{}", cluster.node(2).grpc, cluster.node(3).grpc);
    let cli = std::thread::spawn(move || {
        vow_tests::vow(&["--endpoints", &endpoints, "watch", "--prefix", "c-", "--count", "3", "--from", &from])
    });
    for n in 0..3 {
        client.create(create_req(&format!("c-{n}"), "")).await?;
        client.reject(&format!("c-{n}"), value("no"), None).await?;
    }
    let out = cli.join().map_err(|_| anyhow::anyhow!("cli thread"))?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    ensure!(
        lines.len() == 3 && lines.iter().all(|l| l["state"] == "REJECTED" && l["resume_token"].is_string()),
        "{lines:?}"
    );
    Ok(())
}

async fn settled(w: &mut vow_client::Watch) -> anyhow::Result<pb::Promise> {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(60), w.next()).await.context("watch stalled")??;
        if let Some(p) = e.promise {
            return Ok(p);
        }
    }
}
