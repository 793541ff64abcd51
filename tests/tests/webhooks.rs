//! Webhooks (issue #16): a settled promise's record POSTed, signed, to a subscriber's URL, at
//! least once, from the replicated subscription, by whichever node leads the promise's shard.
//! Real `vowd` processes and a real receiver (`vow-functions`' `/hooks`); signatures checked
//! with the secret `vow webhook-secret` prints, as a receiver would.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::Value as Json;
use vow_client::{Client, Error, pb};
use vow_tests::{DevCluster, Functions, value};

/// The webhook secret, as an operator hands it to a receiver.
fn webhook_secret(cluster: &DevCluster) -> anyhow::Result<String> {
    let keys = cluster.dir.path().join("completion-keys");
    let out = vow_tests::vow(&["webhook-secret", "--keys-file", &keys.display().to_string()]);
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Waits until receiver `name` has taken a delivery (answered 2xx: it refuses the first
/// `refusals`), and returns every delivery it got.
async fn delivered(functions: &Functions, name: &str, refusals: usize) -> anyhow::Result<Vec<Json>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = functions.hooks(name)?;
        if got.len() > refusals {
            return Ok(got);
        }
        ensure!(Instant::now() < deadline, "{name} got {} deliveries: {got:?}", got.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks each delivery: signed under `secret`, keyed by the subscription, carrying the record.
fn check(deliveries: &[Json], secret: &str, subscription: &str, id: &str, state: &str) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    for d in deliveries {
        let body = d["body"].as_str().context("body")?;
        let signature = d["signature"].as_str().context("signature")?;
        vow_client::webhook::verify(secret, signature, body.as_bytes(), now, 600_000)
            .with_context(|| format!("delivery {d}"))?;
        ensure!(d["idempotencyKey"] == subscription, "{d}");
        let body: Json = serde_json::from_str(body)?;
        ensure!(body["subscriptionId"] == subscription, "{body}");
        ensure!(body["promise"]["id"] == id && body["promise"]["state"] == state, "{body}");
    }
    Ok(())
}

async fn status(client: &Client, subscription: &str) -> anyhow::Result<pb::ContinuationStatus> {
    Ok(client.get_continuation(subscription).await?)
}

async fn eventually_done(client: &Client, subscription: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(client, subscription).await?;
        if s.status == "DONE" {
            return Ok(s.note);
        }
        ensure!(Instant::now() < deadline, "{subscription} is {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader of the promise's shard dies (kill -9) after the settlement, while its delivery
/// is being retried; the next leader delivers. Every delivery verifies.
#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_survives_the_death_of_the_leader_that_owed_it() -> anyhow::Result<()> {
    let mut cluster = DevCluster::up(3, &[])?;
    cluster.leader().await?;
    let functions = Functions::start(&[])?;
    let client = cluster.client();
    let secret = webhook_secret(&cluster)?;
    client.create(vow_tests::create_req("hooked", "c-hooked")).await?;
    // The receiver refuses the first 4 attempts: the owing leader is mid-retry when it dies.
    let url = functions.url("/hooks/kill/4");
    let sub = client.subscribe("hooked", &url, HashMap::from([("x-team".into(), "billing".into())])).await?;
    ensure!(client.subscribe("hooked", &url, HashMap::from([("x-team".into(), "billing".into())])).await? == sub);
    ensure!(status(&client, &sub).await?.status == "WAITING");
    let leader = cluster.leader_of("hooked").await?;
    client.resolve("hooked", value("paid"), Some("s-hooked".into())).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while functions.hooks("kill")?.is_empty() {
        ensure!(Instant::now() < deadline, "no delivery attempt");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.kill9(leader)?;
    let got = delivered(&functions, "kill", 4).await?;
    check(&got, &secret, &sub, "hooked", "STATE_RESOLVED")?;
    let client = Client::connect(
        &cluster
            .endpoints()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i as u64 + 1 != leader)
            .map(|(_, e)| e)
            .collect::<Vec<_>>(),
    )?;
    let note = eventually_done(&client, &sub).await?;
    ensure!(note.contains("delivered"), "{note}");
    cluster.reup()?;
    Ok(())
}

/// Subscribing after the settlement delivers at once; a Create's own webhooks see its timeout;
/// bad subscriptions are refused with the documented codes.
#[tokio::test(flavor = "multi_thread")]
async fn subscriptions_at_create_after_settlement_and_refused() -> anyhow::Result<()> {
    let cluster = DevCluster::up(3, &[])?;
    cluster.leader().await?;
    let functions = Functions::start(&[])?;
    let client = cluster.client();
    let secret = webhook_secret(&cluster)?;

    client.create(vow_tests::create_req("early", "")).await?;
    client.reject("early", value("declined"), None).await?;
    let sub = client.subscribe("early", &functions.url("/hooks/late/0"), HashMap::new()).await?;
    let got = delivered(&functions, "late", 0).await?;
    ensure!(got.len() == 1, "{got:?}");
    check(&got, &secret, &sub, "early", "STATE_REJECTED")?;

    // Registered with the create; the promise times out and the webhook says so.
    let deadline_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64 + 1_000;
    let created = client
        .create(pb::CreateRequest {
            id: "timed".into(),
            deadline_ms,
            webhooks: vec![pb::Webhook { url: functions.url("/hooks/timeout/1"), headers: HashMap::new() }],
            ..Default::default()
        })
        .await?;
    ensure!(created.subscription_ids.len() == 1, "{created:?}");
    let got = delivered(&functions, "timeout", 1).await?;
    check(&got, &secret, &created.subscription_ids[0], "timed", "STATE_REJECTED_TIMEDOUT")?;

    match client.subscribe("never-created", &functions.url("/hooks/x/0"), HashMap::new()).await {
        Err(Error::NotFound(_)) => {}
        other => anyhow::bail!("expected NOT_FOUND, got {other:?}"),
    }
    for bad in ["https://example.com/hook", "ftp://x", ""] {
        match client.subscribe("early", bad, HashMap::new()).await {
            Err(Error::InvalidArgument(m)) => ensure!(m.contains("http://"), "{m}"),
            other => anyhow::bail!("{bad}: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
    let webhook = |url: &str| pb::Webhook { url: url.into(), headers: HashMap::new() };
    match client
        .create(pb::CreateRequest { id: "bad-hook".into(), webhooks: vec![webhook("https://x")], ..Default::default() })
        .await
    {
        Err(Error::InvalidArgument(_)) => {}
        other => anyhow::bail!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    ensure!(matches!(client.get("bad-hook").await, Err(Error::NotFound(_))), "a refused create writes nothing");
    Ok(())
}

/// Receivers that are down hold no share of the node's executor while their deliveries wait to
/// be retried: with more failing webhooks than the node runs calls at once (256), a pipeline
/// step still runs at once.
#[tokio::test(flavor = "multi_thread")]
async fn failing_receivers_do_not_starve_pipelines() -> anyhow::Result<()> {
    let cluster = DevCluster::up(1, &[])?;
    cluster.leader().await?;
    let functions = Functions::start(&[])?;
    let client = cluster.client();
    let dead = functions.url("/hooks/dead/1000000000");
    let creates = (0..300).map(|n| {
        let client = client.clone();
        let dead = dead.clone();
        async move {
            let id = format!("noisy-{n}");
            let webhooks = vec![pb::Webhook { url: dead, headers: HashMap::new() }];
            client.create(pb::CreateRequest { id: id.clone(), webhooks, ..Default::default() }).await?;
            client.resolve(&id, value("x"), None).await?;
            anyhow::Ok(())
        }
    });
    futures::future::try_join_all(creates).await?;
    // Every delivery has been tried and is waiting to be tried again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while functions.hooks("dead")?.len() < 300 {
        ensure!(Instant::now() < deadline, "only {} first attempts", functions.hooks("dead")?.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let step = pb::Continuation {
        id: "quiet-step".into(),
        sources: vec!["quiet-a".into()],
        target: "quiet-b".into(),
        action: Some(pb::continuation::Action::Invoke(pb::Invoke {
            url: functions.url("/append/!"),
            timeout_ms: 5_000,
            ..Default::default()
        })),
        ..Default::default()
    };
    client
        .submit(pb::SubmitRequest {
            promises: vec![
                pb::CreateRequest { id: "quiet-a".into(), ..Default::default() },
                pb::CreateRequest { id: "quiet-b".into(), ..Default::default() },
            ],
            continuations: vec![step],
            ..Default::default()
        })
        .await?;
    client.resolve("quiet-a", value("hi"), None).await?;
    let b = client.await_settled("quiet-b", Duration::from_secs(20)).await?;
    ensure!(b.value.map(|v| v.data) == Some(b"hi!".to_vec()), "the step ran");
    ensure!(started.elapsed() < Duration::from_secs(5), "the step took {:?}", started.elapsed());
    Ok(())
}
