//! Promise pipelining end to end (issue #15): real `vowd` processes with eight shards, real HTTP
//! functions (`vow-functions`), graphs submitted in one call. Each test checks what a user sees
//! (the values the targets settle with) and that every target is settled exactly once, by its
//! own continuation: its settle idempotency key is `vow-cont:<continuation id>`.

use std::time::Duration;

use anyhow::{Context, ensure};
use vow_client::{Client, Error, pb};
use vow_tests::{DevCluster, Functions, value};

fn create(id: &str) -> pb::CreateRequest {
    pb::CreateRequest {
        id: id.into(),
        param: None,
        deadline_ms: 0,
        tags: Default::default(),
        idempotency_key: String::new(),
        ..Default::default()
    }
}

fn invoke(cid: &str, source: &str, target: &str, url: String) -> pb::Continuation {
    pb::Continuation {
        id: cid.into(),
        sources: vec![source.into()],
        target: target.into(),
        combinator: 0,
        on: pb::On::Resolved as i32,
        action: Some(pb::continuation::Action::Invoke(pb::Invoke {
            url,
            headers: Default::default(),
            timeout_ms: 5_000,
            prewarm: false,
        })),
    }
}

fn forward(cid: &str, sources: &[&str], target: &str) -> pb::Continuation {
    pb::Continuation {
        id: cid.into(),
        sources: sources.iter().map(|s| (*s).to_owned()).collect(),
        target: target.into(),
        combinator: 0,
        on: pb::On::Resolved as i32,
        action: Some(pb::continuation::Action::Forward(pb::Forward { recover: false })),
    }
}

fn text(p: &pb::Promise) -> String {
    String::from_utf8_lossy(&p.value.as_ref().map(|v| v.data.clone()).unwrap_or_default()).into_owned()
}

fn state(p: &pb::Promise) -> pb::State {
    pb::State::try_from(p.state).unwrap_or(pb::State::Unspecified)
}

/// Waits for `id` to settle and checks it was settled by continuation `cid`.
async fn settled_by(client: &Client, id: &str, cid: &str) -> anyhow::Result<pb::Promise> {
    let p = client.await_settled(id, Duration::from_secs(60)).await?;
    ensure!(state(&p) != pb::State::Pending, "{id} is still pending");
    ensure!(
        p.idempotency_key_settle == format!("vow-cont:{cid}"),
        "{id} was settled with key {:?}, not by continuation {cid}",
        p.idempotency_key_settle
    );
    Ok(p)
}

/// The continuation's status once it is DONE: the leader proposes finished continuations
/// done a moment after they ran (many in one entry).
async fn done(client: &Client, cid: &str) -> anyhow::Result<pb::ContinuationStatus> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.get_continuation(cid).await?;
        if status.status == "DONE" {
            return Ok(status);
        }
        ensure!(tokio::time::Instant::now() < deadline, "{cid} is still {}: {status:?}", status.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A chain `in -> s1 -> ... -> sN`, step i calling `route(i)`; ids are spread over shards.
fn chain(run: &str, steps: usize, route: impl Fn(usize) -> String) -> pb::SubmitRequest {
    let mut req = pb::SubmitRequest { idempotency_key: format!("{run}-submit"), ..Default::default() };
    for i in 1..=steps {
        req.promises.push(create(&format!("{run}-s{i}")));
        let source = if i == 1 { format!("{run}-in") } else { format!("{run}-s{}", i - 1) };
        req.continuations.push(invoke(&format!("{run}-c{i}"), &source, &format!("{run}-s{i}"), route(i)));
    }
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ten_step_chain_runs_across_shards_and_the_client_waits_once() -> anyhow::Result<()> {
    let cluster = DevCluster::up(3, &[])?;
    let functions = Functions::start(&[])?;
    let client = cluster.client();
    client.create(create("t-in")).await?;
    client.resolve("t-in", value("x"), None).await?;
    // The source is settled already: the chain starts as soon as it is registered, and the
    // one Submit call returns with the last step's value.
    let mut req = chain("t", 10, |i| functions.url(&format!("/append/-{i}")));
    req.wait_for = "t-s10".into();
    req.wait_timeout_ms = 60_000;
    let reply = client.submit(req).await?;
    ensure!(reply.promises.len() == 10, "ten promises created: {:?}", reply.promises.len());
    let last = reply.waited.context("the reply waits for t-s10")?;
    if text(&last) != "x-1-2-3-4-5-6-7-8-9-10" {
        let mut steps = String::new();
        for i in 1..=10 {
            let status = client.get_continuation(&format!("t-c{i}")).await;
            steps.push_str(&format!("t-c{i}: {status:?}\n"));
        }
        anyhow::bail!("the chain's value: {:?}\n{steps}{}", text(&last), cluster.logs());
    }
    for i in 1..=10 {
        let p = settled_by(&client, &format!("t-s{i}"), &format!("t-c{i}")).await?;
        let want: String = std::iter::once("x".to_owned()).chain((1..=i).map(|k| format!("-{k}"))).collect();
        ensure!(text(&p) == want, "step {i} holds {:?}", text(&p));
        let headers = p.value.as_ref().map(|v| v.headers.clone()).unwrap_or_default();
        ensure!(
            headers.get("vow-step").map(String::as_str) == Some(&format!("-{i}")[..]),
            "Vow-* headers kept: {headers:?}"
        );
    }
    let shards: std::collections::BTreeSet<u32> =
        futures_shards(&client, (1..=10).map(|i| format!("t-s{i}")).collect()).await?;
    ensure!(shards.len() >= 4, "the chain spans several shards: {shards:?}");
    let status = done(&client, "t-c10").await?;
    ensure!(status.note.contains("settled t-s10 as RESOLVED"), "{}", status.note);
    // The executors' metrics, summed over the nodes whose leaders ran the steps: ten function
    // calls answered, ten continuations marked done (each once: a leader change would add a
    // rerun, not hide one), and none under way any more.
    let sum = |name: &str, filter: &str| -> anyhow::Result<f64> {
        let mut total = 0.0;
        for n in &cluster.nodes {
            total += cluster
                .metrics_of(n.node_id)?
                .lines()
                .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(filter))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        Ok(total)
    };
    ensure!(sum("vow_continuation_attempts_total", "kind=\"function\",result=\"ok\"")? >= 10.0);
    // A leader counts its continuations done once its `Complete` is applied, a moment after a
    // reader can see them DONE.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sum("vow_continuations_done_total", "")? < 10.0 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "continuations done: {}",
            sum("vow_continuations_done_total", "")?
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll the counter
    }
    ensure!(sum("vow_continuation_attempts_running", "")? == 0.0);
    Ok(())
}

async fn futures_shards(client: &Client, ids: Vec<String>) -> anyhow::Result<std::collections::BTreeSet<u32>> {
    let mut shards = std::collections::BTreeSet::new();
    for id in ids {
        shards.insert(client.locate(&id).await?.shard_id);
    }
    Ok(shards)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failures_are_retried_and_permanent_ones_reject_down_to_the_catch() -> anyhow::Result<()> {
    let cluster = DevCluster::up(3, &[])?;
    let functions = Functions::start(&[])?;
    let client = cluster.client();
    client.create(create("f-in")).await?;
    let mut req = pb::SubmitRequest { idempotency_key: "f".into(), ..Default::default() };
    for id in ["f-flaky", "f-fail", "f-then", "f-catch"] {
        req.promises.push(create(id));
    }
    // 503 three times, then an answer.
    req.continuations.push(invoke("f-c1", "f-in", "f-flaky", functions.url("/flaky/3/-ok")));
    // 422: final.
    req.continuations.push(invoke("f-c2", "f-flaky", "f-fail", functions.url("/fail")));
    // A then-step does not run on a rejection; the rejection passes through it.
    req.continuations.push(invoke("f-c3", "f-fail", "f-then", functions.url("/upper")));
    // The catch runs and recovers.
    let mut catch = forward("f-c4", &["f-then"], "f-catch");
    catch.on = pb::On::Rejected as i32;
    catch.action = Some(pb::continuation::Action::Forward(pb::Forward { recover: true }));
    req.continuations.push(catch);
    client.submit(req).await?;
    client.resolve("f-in", value("in"), None).await?;

    let flaky = settled_by(&client, "f-flaky", "f-c1").await?;
    ensure!(state(&flaky) == pb::State::Resolved && text(&flaky) == "in-ok", "{flaky:?}");
    let failed = settled_by(&client, "f-fail", "f-c2").await?;
    ensure!(state(&failed) == pb::State::Rejected, "a 422 rejects: {failed:?}");
    ensure!(text(&failed) == "permanent failure: in-ok", "the body is the rejection: {:?}", text(&failed));
    let passed = settled_by(&client, "f-then", "f-c3").await?;
    ensure!(state(&passed) == pb::State::Rejected && text(&passed) == text(&failed), "passed through: {passed:?}");
    let caught = settled_by(&client, "f-catch", "f-c4").await?;
    ensure!(state(&caught) == pb::State::Resolved && text(&caught) == text(&failed), "recovered: {caught:?}");
    let calls = functions.calls()?;
    ensure!(calls.get("f-c1") == Some(&4), "three failures and a success: {calls:?}");
    ensure!(calls.get("f-c2") == Some(&1) && !calls.contains_key("f-c3"), "no retry of a final answer: {calls:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_function_can_answer_with_a_promise_the_target_then_follows() -> anyhow::Result<()> {
    let cluster = DevCluster::up(3, &[])?;
    let functions = Functions::start(&[])?;
    let client = cluster.client();
    client.create(create("a-in")).await?;
    client.create(create("a-human-task")).await?;
    let req = pb::SubmitRequest {
        promises: vec![create("a-out")],
        continuations: vec![invoke("a-c1", "a-in", "a-out", functions.url("/adopt/a-human-task"))],
        ..Default::default()
    };
    client.submit(req).await?;
    client.resolve("a-in", value("job"), None).await?;
    // The function answered 202 + Vow-Promise; the target waits for the external task.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ensure!(functions.calls()?.get("a-c1") == Some(&1), "the function was called");
    ensure!(state(&client.get("a-out").await?) == pb::State::Pending, "a-out waits for the task");
    client.resolve("a-human-task", value("answer from a human"), None).await?;
    let out = client.await_settled("a-out", Duration::from_secs(30)).await?;
    ensure!(state(&out) == pb::State::Resolved && text(&out) == "answer from a human", "{out:?}");
    ensure!(out.idempotency_key_settle == "vow-cont:a-c1#adopt", "{}", out.idempotency_key_settle);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_any_and_race_join_sources_on_other_shards() -> anyhow::Result<()> {
    let cluster = DevCluster::up(3, &[])?;
    let client = cluster.client();
    for id in ["j-a", "j-b", "j-c"] {
        client.create(create(id)).await?;
    }
    let join = |cid: &str, combinator: pb::Combinator, target: &str| {
        let mut c = forward(cid, &["j-a", "j-b", "j-c"], target);
        c.combinator = combinator as i32;
        c
    };
    let req = pb::SubmitRequest {
        promises: vec![create("j-all"), create("j-any"), create("j-race")],
        continuations: vec![
            join("j-all-c", pb::Combinator::All, "j-all"),
            join("j-any-c", pb::Combinator::Any, "j-any"),
            join("j-race-c", pb::Combinator::Race, "j-race"),
        ],
        idempotency_key: "joins".into(),
        ..Default::default()
    };
    client.submit(req).await?;
    let shards = futures_shards(&client, ["j-a", "j-b", "j-c", "j-all"].map(String::from).to_vec()).await?;
    ensure!(shards.len() >= 3, "sources and target on several shards: {shards:?}");
    client.reject("j-b", value("b failed"), None).await?;
    let race_p = client.await_settled("j-race", Duration::from_secs(30)).await?;
    ensure!(
        state(&race_p) == pb::State::Rejected && text(&race_p) == "b failed",
        "race: the first settlement {race_p:?}"
    );
    let all = client.await_settled("j-all", Duration::from_secs(30)).await?;
    ensure!(state(&all) == pb::State::Rejected && text(&all) == "b failed", "all fails fast: {all:?}");
    ensure!(state(&client.get("j-any").await?) == pb::State::Pending, "any waits for a resolution");
    client.resolve("j-c", value("c!"), None).await?;
    let any = client.await_settled("j-any", Duration::from_secs(30)).await?;
    ensure!(state(&any) == pb::State::Resolved && text(&any) == "c!", "any: the first resolution {any:?}");
    for (target, cid) in [("j-all", "j-all-c"), ("j-any", "j-any-c"), ("j-race", "j-race-c")] {
        let p = client.get(target).await?;
        ensure!(p.idempotency_key_settle == format!("vow-cont:{cid}"), "{target}: {}", p.idempotency_key_settle);
    }

    // All resolving: the documented JSON array, in source order.
    for id in ["k-a", "k-b"] {
        client.create(create(id)).await?;
    }
    let mut all = forward("k-all-c", &["k-a", "k-b"], "k-all");
    all.combinator = pb::Combinator::All as i32;
    client
        .submit(pb::SubmitRequest { promises: vec![create("k-all")], continuations: vec![all], ..Default::default() })
        .await?;
    client.resolve("k-b", value("B"), None).await?;
    client.resolve("k-a", value("A"), None).await?;
    let joined = client.await_settled("k-all", Duration::from_secs(30)).await?;
    ensure!(state(&joined) == pb::State::Resolved, "{joined:?}");
    ensure!(
        text(&joined)
            == r#"[{"id":"k-a","state":"RESOLVED","value":"QQ==","headers":{}},{"id":"k-b","state":"RESOLVED","value":"Qg==","headers":{}}]"#,
        "{}",
        text(&joined)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chain_survives_kill_9_of_leaders_and_settles_every_target_once() -> anyhow::Result<()> {
    let mut cluster = DevCluster::up(3, &[])?;
    let functions = Functions::start(&[])?;
    let client = cluster.client();
    client.create(create("k9-in")).await?;
    client.submit(chain("k9", 10, |i| functions.url(&format!("/delay/300/-{i}")))).await?;
    client.resolve("k9-in", value("x"), None).await?;
    // Mid-chain, the leader of the next step's source dies; then another node does.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let victim = cluster.leader_of("k9-s3").await?;
    cluster.kill9(victim)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.reup()?;
    let last = client.await_settled("k9-s10", Duration::from_secs(90)).await?;
    ensure!(text(&last) == "x-1-2-3-4-5-6-7-8-9-10", "{:?}\n{}", text(&last), cluster.logs());
    for i in 1..=10 {
        let p = settled_by(&client, &format!("k9-s{i}"), &format!("k9-c{i}")).await?;
        ensure!(p.revision > 0);
    }
    let calls = functions.calls()?;
    ensure!((1..=10).all(|i| calls.contains_key(&format!("k9-c{i}"))), "every step was called: {calls:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_submit_completes_the_graph_and_a_bad_one_is_refused_whole() -> anyhow::Result<()> {
    let cluster = DevCluster::up(3, &[])?;
    let client = cluster.client();
    client.create(create("r-in")).await?;
    let req = pb::SubmitRequest {
        promises: vec![create("r-a"), create("r-b")],
        continuations: vec![forward("r-c1", &["r-in"], "r-a"), forward("r-c2", &["r-a"], "r-b")],
        idempotency_key: "r-key".into(),
        ..Default::default()
    };
    let first = client.submit(req.clone()).await?;
    // The reply was lost; the client sends the same Submit again.
    let again = client.submit(req.clone()).await?;
    ensure!(first.promises.len() == 2 && again.promises.len() == 2);
    ensure!(
        first.promises.iter().zip(&again.promises).all(|(a, b)| a.revision == b.revision),
        "the same records, not new ones"
    );
    client.resolve("r-in", value("v"), None).await?;
    let b = settled_by(&client, "r-b", "r-c2").await?;
    ensure!(text(&b) == "v");

    // The same ids with another key: a conflict naming the promise, nothing else registered.
    let mut other = req.clone();
    other.idempotency_key = "another".into();
    match client.submit(other).await {
        Err(Error::AlreadyExists { message, .. }) => {
            ensure!(message.contains("r-a") || message.contains("r-b"), "{message}")
        }
        other => anyhow::bail!("expected ALREADY_EXISTS, got {other:?}"),
    }
    // A source that does not exist.
    let missing = pb::SubmitRequest {
        promises: vec![create("m-a")],
        continuations: vec![forward("m-c1", &["m-nowhere"], "m-a")],
        ..Default::default()
    };
    match client.submit(missing).await {
        Err(Error::NotFound(message)) => ensure!(message.contains("m-nowhere"), "{message}"),
        other => anyhow::bail!("expected NOT_FOUND, got {other:?}"),
    }
    // Refused whole, naming the problem: a cycle, an unknown target.
    let cycle = pb::SubmitRequest {
        promises: vec![create("y-a"), create("y-b")],
        continuations: vec![forward("y-c1", &["y-a"], "y-b"), forward("y-c2", &["y-b"], "y-a")],
        ..Default::default()
    };
    match client.submit(cycle).await {
        Err(Error::InvalidArgument(message)) => ensure!(message.contains("cycle"), "{message}"),
        other => anyhow::bail!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    ensure!(matches!(client.get("y-a").await, Err(Error::NotFound(_))), "nothing of a refused graph was created");
    let unknown = pb::SubmitRequest { continuations: vec![forward("u-c1", &["r-in"], "u-x")], ..Default::default() };
    match client.submit(unknown).await {
        Err(Error::InvalidArgument(message)) => ensure!(message.contains("does not create"), "{message}"),
        other => anyhow::bail!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_submits_a_yaml_pipeline_waits_for_it_and_shows_its_progress() -> anyhow::Result<()> {
    let cluster = DevCluster::up(3, &[])?;
    let functions = Functions::start(&[])?;
    let client = cluster.client();
    client.create(create("cli-in")).await?;
    client.resolve("cli-in", value("hello"), None).await?;
    let yaml = format!(
        r#"
idempotency_key: cli-run
promises:
  - id: cli-upper
    deadline_in: 5m
  - id: cli-done
continuations:
  - id: cli-c1
    sources: [cli-in]
    target: cli-upper
    invoke: {{ url: "{}", prewarm: true }}
  - sources: [cli-upper]
    target: cli-done
    forward: {{}}
"#,
        functions.url("/upper")
    );
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, yaml)?;
    let endpoints = cluster.endpoints().join(",");
    let file = file.to_string_lossy().into_owned();
    let out = vow_tests::vow(&["--endpoints", &endpoints, "pipeline", "submit", &file, "--wait"]);
    ensure!(out.status.success(), "submit failed: {}", String::from_utf8_lossy(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(reply["waited"]["id"] == "cli-done", "{reply}");
    ensure!(reply["waited"]["value"]["data"] == "HELLO", "{reply}");
    ensure!(reply["promises"].as_array().map(Vec::len) == Some(2), "{reply}");

    done(&client, "cli-c1").await?;
    done(&client, "to:cli-done").await?;
    let out = vow_tests::vow(&["--endpoints", &endpoints, "pipeline", "show", "--file", &file]);
    ensure!(out.status.success(), "show failed: {}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let ids: Vec<&str> = shown.as_array().context("a list")?.iter().filter_map(|s| s["id"].as_str()).collect();
    ensure!(ids == ["cli-c1", "to:cli-done"], "{shown}");
    ensure!(shown.as_array().context("a list")?.iter().all(|s| s["status"] == "DONE"), "{shown}");

    // A mistake in the file is named, with the CLI's exit code for bad input.
    std::fs::write(
        dir.path().join("bad.yaml"),
        "continuations: [{sources: [a], target: b, on: sometimes, forward: {}}]",
    )?;
    let bad = dir.path().join("bad.yaml").to_string_lossy().into_owned();
    let out = vow_tests::vow(&["--endpoints", &endpoints, "pipeline", "submit", &bad]);
    ensure!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("sometimes"));
    Ok(())
}

/// A Submit writes each shard's part at once, so a continuation whose source is settled
/// already may run before the shard holding its target has applied its create (a slow shard, a
/// leader change). The continuation must wait for its target — it once gave up at once ("target
/// does not exist"), leaving the target pending for good and breaking a ten-step chain under
/// load. The failpoint `late-submit-creates` makes every such part late.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_continuation_waits_for_a_target_its_submit_has_not_created_yet() -> anyhow::Result<()> {
    let vowd = vow_tests::sabotaged_vowd().display().to_string();
    let env = [("VOW_VOWD", vowd.as_str()), ("VOW_SABOTAGE", "late-submit-creates")];
    let cluster = DevCluster::up_env(3, &[], &[], &env)?;
    let client = cluster.client();
    let shard = |id: &str| vow_core::ShardId::for_promise(&vow_core::PromiseId::new_unchecked(id), 8).0;
    for i in 0..4 {
        // The source settled first; the target an id on another shard.
        let source = format!("early-src-{i}");
        let target = (0..).map(|k| format!("early-dst-{i}-{k}")).find(|t| shard(t) != shard(&source)).expect("an id");
        client.create(create(&source)).await?;
        client.resolve(&source, value(&format!("v{i}")), None).await?;
        let cid = format!("early-c{i}");
        client
            .submit(pb::SubmitRequest {
                idempotency_key: format!("early-{i}"),
                promises: vec![create(&target)],
                continuations: vec![forward(&cid, &[source.as_str()], &target)],
                ..Default::default()
            })
            .await?;
        let p = client.await_settled(&target, Duration::from_secs(30)).await?;
        let status = client.get_continuation(&cid).await?;
        ensure!(text(&p) == format!("v{i}"), "{target} holds {:?}; {cid}: {status:?}", text(&p));
        ensure!(
            p.idempotency_key_settle == format!("vow-cont:{cid}"),
            "{target} settled by {:?}",
            p.idempotency_key_settle
        );
        // It waited for the target (the attempts say so) and is done, having settled it.
        let status = done(&client, &cid).await?;
        ensure!(status.note == format!("settled {target} as RESOLVED"), "{cid}: {status:?}");
    }
    Ok(())
}
