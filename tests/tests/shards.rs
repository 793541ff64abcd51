//! Three real `vowd` processes with the default eight shards: every shard served through any
//! node (the router carries each request to its shard's leader), leaders spread and re-spread
//! after a node returns, a node lost or replaced under load loses nothing, and markers that
//! only mean something between nodes do nothing when an outside client sends them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use vow_api::route as wire;
use vow_client::{Client, Options, pb};
use vow_core::{PromiseId, ShardId};
use vow_tests::{DevCluster, create_req, value, vow};

const SHARDS: u32 = 8;

fn shard_of(id: &str) -> u32 {
    ShardId::for_promise(&PromiseId::new_unchecked(id), SHARDS).0
}

/// `prefix-N` ids, `per_shard` on every shard.
fn ids_on_every_shard(prefix: &str, per_shard: usize) -> Vec<String> {
    let mut count = BTreeMap::<u32, usize>::new();
    let mut ids = Vec::new();
    for i in 0.. {
        let id = format!("{prefix}-{i}");
        let n = count.entry(shard_of(&id)).or_default();
        if *n < per_shard {
            *n += 1;
            ids.push(id);
        }
        if count.len() == SHARDS as usize && count.values().all(|n| *n == per_shard) {
            break;
        }
    }
    ids
}

/// How many shards each node leads, by a status (voters leading none included).
fn leads(s: &pb::StatusResponse) -> BTreeMap<u64, usize> {
    let mut out: BTreeMap<u64, usize> = s.shards.iter().flat_map(|sh| sh.voters.iter().map(|v| (*v, 0))).collect();
    for sh in s.shards.iter().filter(|sh| sh.leader_id != 0) {
        *out.entry(sh.leader_id).or_default() += 1;
    }
    out
}

/// The status once every shard has a leader and no node leads more than `most`.
async fn spread(cluster: &DevCluster, most: usize, within: Duration) -> anyhow::Result<pb::StatusResponse> {
    cluster
        .wait_for("every shard led, leadership spread", within, |s| {
            let led = s.shards.len() == SHARDS as usize && s.shards.iter().all(|sh| sh.leader_id != 0);
            (led && leads(s).values().all(|n| *n <= most)).then(|| s.clone())
        })
        .await
}

/// Requests node `id`'s router sent to another node (`sent`) or served for one (`served`).
fn routed(cluster: &DevCluster, id: u64, direction: &str) -> anyhow::Result<u64> {
    let prefix = format!("vow_routed_requests_total{{node=\"{id}\",direction=\"{direction}\"}} ");
    let text = cluster.metrics_of(id)?;
    let line = text.lines().find_map(|l| l.strip_prefix(&prefix)).ok_or_else(|| anyhow::anyhow!("no {prefix}"))?;
    Ok(line.trim().parse()?)
}

/// A client that talks to node `id` only: every request for a shard led elsewhere is routed.
fn only(cluster: &DevCluster, id: u64) -> Client {
    Client::with_options(
        &[cluster.node(id).grpc.as_str()],
        Options { follow_leader_hints: false, ..Default::default() },
    )
    .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shard_serves_through_any_node_and_leaders_spread() -> anyhow::Result<()> {
    let cluster = DevCluster::up(3, &[])?;
    let status = spread(&cluster, 3, Duration::from_secs(30)).await?;
    assert_eq!(status.shards.len(), SHARDS as usize, "eight shards by default");
    let via = 1;
    let led_here: BTreeSet<u32> = status.shards.iter().filter(|s| s.leader_id == via).map(|s| s.shard_id).collect();
    assert!(led_here.len() < SHARDS as usize, "node {via} leads every shard: {status:?}");

    let c = only(&cluster, via);
    let ids = ids_on_every_shard("every", 3);
    for id in &ids {
        c.create(create_req(id, &format!("c-{id}"))).await?;
        let settled = c.resolve(id, value(id), Some(format!("r-{id}"))).await?;
        assert_eq!(settled.promise.map(|p| p.state), Some(pb::State::Resolved as i32), "{id}");
        let read = c.get(id).await?;
        assert_eq!(read.value.map(|v| v.data), Some(id.as_bytes().to_vec()), "{id}");
    }
    let elsewhere = ids.iter().filter(|id| !led_here.contains(&shard_of(id))).count();
    let sent = routed(&cluster, via, "sent")?;
    println!(
        "{} ids on {SHARDS} shards through node {via}, {elsewhere} led elsewhere; {sent} requests routed",
        ids.len()
    );
    // A create, a resolve and a read of each id led elsewhere went to its leader.
    assert!(sent >= 3 * elsewhere as u64, "node {via} routed {sent} requests for {elsewhere} ids led elsewhere");
    let served: u64 =
        [1, 2, 3].iter().filter(|n| **n != via).map(|n| routed(&cluster, *n, "served")).sum::<anyhow::Result<u64>>()?;
    assert!(served >= sent, "the leaders served {served} of {sent} routed requests");

    // An Await through a node that does not lead the promise's shard.
    let elsewhere = ids_on_every_shard("wait", 1).into_iter().find(|id| !led_here.contains(&shard_of(id)));
    let id = elsewhere.expect("a shard led elsewhere");
    c.create(create_req(&id, "")).await?;
    let waiter = {
        let c = c.clone();
        let id = id.clone();
        tokio::spawn(async move { c.await_settled(&id, Duration::from_secs(20)).await })
    };
    // The waiter is waiting on node `via`, so the settle below is not raced by its first read.
    vow_tests::eventually("the await to wait", Duration::from_secs(10), || {
        Ok(cluster.metric(via, "vow_awaits_waiting")? >= 1.0)
    })
    .await?;
    cluster.client().reject(&id, value("no"), None).await?;
    let awaited = waiter.await??;
    assert_eq!(awaited.state, pb::State::Rejected as i32);

    // A search through the same node finds every shard's records, in id order, page by page.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .search(pb::SearchRequest { id_prefix: "every-".into(), limit: 7, page_token: token, ..Default::default() })
            .await?;
        seen.extend(page.promises.into_iter().map(|p| p.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(seen, expected);
    Ok(())
}

/// What clients were told in [`load`]: acknowledged creates and resolves, and failures.
#[derive(Default, Debug)]
struct Acks {
    created: Vec<String>,
    resolved: Vec<String>,
    errors: Vec<String>,
}

/// Creates and resolves promises on every shard until `until`, recording acknowledgements.
async fn load(client: Client, name: String, acks: Arc<Mutex<Acks>>, until: Instant) {
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let id = format!("{name}-{n}");
        let created = client.create(create_req(&id, &format!("c-{id}"))).await;
        let resolved = match &created {
            Ok(_) => Some(client.resolve(&id, value(&id), Some(format!("r-{id}"))).await),
            Err(_) => None,
        };
        let mut a = acks.lock().expect("lock");
        match created {
            Ok(_) => a.created.push(id.clone()),
            Err(e) => a.errors.push(format!("create {id}: {e}")),
        }
        match resolved {
            Some(Ok(_)) => a.resolved.push(id),
            Some(Err(e)) => a.errors.push(format!("resolve {id}: {e}")),
            None => {}
        }
    }
}

fn start_load(endpoints: &[String], clients: usize, run: Duration) -> LoadRun {
    let acks = Arc::new(Mutex::new(Acks::default()));
    let until = Instant::now() + run;
    let tasks = (0..clients)
        .map(|i| {
            let client = Client::connect(endpoints).expect("client");
            tokio::spawn(load(client, format!("load{i}"), acks.clone(), until))
        })
        .collect();
    LoadRun { acks, tasks }
}

struct LoadRun {
    acks: Arc<Mutex<Acks>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl LoadRun {
    async fn finish(self) -> anyhow::Result<Acks> {
        for t in self.tasks {
            t.await?;
        }
        let acks = std::mem::take(&mut *self.acks.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
        Ok(acks)
    }
}

impl Acks {
    fn summary(&self) -> String {
        format!(
            "{} creates, {} resolves acknowledged; errors: {:?}",
            self.created.len(),
            self.resolved.len(),
            self.errors
        )
    }
}

/// Every acknowledged create is there, and every acknowledged resolve stuck.
async fn verify(client: &Client, acks: &Acks) -> anyhow::Result<()> {
    let resolved: BTreeSet<&String> = acks.resolved.iter().collect();
    for id in &acks.created {
        let p = client.get(id).await.map_err(|e| anyhow::anyhow!("acknowledged create of {id} lost: {e}"))?;
        if resolved.contains(id) {
            assert_eq!(p.state, pb::State::Resolved as i32, "{id}: acknowledged resolve lost");
            assert_eq!(p.value.map(|v| v.data), Some(id.as_bytes().to_vec()), "{id}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_node_leaves_every_shard_serving_and_leadership_respreads_when_it_returns() -> anyhow::Result<()> {
    let mut cluster = DevCluster::up(3, &[])?;
    let status = spread(&cluster, 3, Duration::from_secs(30)).await?;
    let load = start_load(&cluster.endpoints(), 6, Duration::from_secs(14));
    tokio::time::sleep(Duration::from_secs(2)).await; // let load build up before the fault

    // Lose the node that leads the most shards.
    let (victim, led) = leads(&status).into_iter().max_by_key(|(_, n)| *n).expect("a leader");
    let survivor = cluster.nodes.iter().map(|n| n.node_id).find(|id| *id != victim).expect("a survivor");
    cluster.kill9(victim)?;
    let killed = Instant::now();
    let mut took = Duration::ZERO;
    while took < Duration::from_secs(10) {
        if let Ok(s) = cluster.status_of(survivor).await
            && s.shards.iter().all(|sh| sh.leader_id != 0 && sh.leader_id != victim)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // poll for new leaders
        took = killed.elapsed();
    }
    assert!(
        took < Duration::from_secs(5),
        "shards without a leader {took:?} after node {victim} died\n{}",
        cluster.logs()
    );
    // Every shard takes writes again.
    let survivors: Vec<String> = cluster.nodes.iter().filter(|n| n.node_id != victim).map(|n| n.grpc.clone()).collect();
    let c = Client::connect(&survivors)?;
    for id in ids_on_every_shard("after-kill", 1) {
        c.create(create_req(&id, "")).await?;
    }
    println!(
        "node {victim} (leading {led} shards) killed; every shard led elsewhere after {took:?}, all serving after {:?}",
        killed.elapsed()
    );

    // It comes back from its own disk and gets a share of the leaderships again.
    tokio::time::sleep(Duration::from_secs(2)).await; // some load while it is down
    cluster.reup()?;
    let back = Instant::now();
    cluster
        .wait_for("the returned node to lead again, leadership spread", Duration::from_secs(25), |s| {
            let l = leads(s);
            (s.shards.iter().all(|sh| sh.leader_id != 0)
                && l.get(&victim).copied().unwrap_or(0) >= 2
                && l.values().all(|n| *n <= 3))
            .then_some(())
        })
        .await?;
    println!("leadership spread again {:?} after node {victim} restarted", back.elapsed());

    let acks = load.finish().await?;
    println!("{}", acks.summary());
    assert!(acks.created.len() > 100, "too little load got through: {} creates", acks.created.len());
    verify(&cluster.client(), &acks).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_added_and_an_old_one_removed_under_load_lose_nothing() -> anyhow::Result<()> {
    let cluster = DevCluster::up(3, &[])?;
    spread(&cluster, 3, Duration::from_secs(30)).await?;
    // A fourth vowd joining through node 2; the clients know it from the start, as a client
    // configured with the future membership would.
    let mut joiner = cluster.joiner(4)?;
    let grpc = joiner.grpc.clone();
    let mut endpoints = cluster.endpoints();
    endpoints.push(grpc.clone());
    let load = start_load(&endpoints, 4, Duration::from_secs(25));
    tokio::time::sleep(Duration::from_secs(2)).await; // load first, then the change

    joiner.start(&cluster.node(2).peer)?;
    let result = async {
        cluster
            .wait_for("node 4 a voter of every shard", Duration::from_secs(60), |s| {
                s.shards.iter().all(|sh| sh.voters.contains(&4)).then_some(())
            })
            .await?;
        // Remove node 1, whatever it leads, while the load runs.
        let out = vow(&["--endpoints", &cluster.node(2).grpc, "cluster", "remove-node", "--node-id", "1"]);
        anyhow::ensure!(out.status.success(), "remove-node failed: {}", String::from_utf8_lossy(&out.stderr));
        // Asked through node 2: node 1 never hears that its own removal committed.
        let s = wait_via(&cluster, 2, "node 1 out of every shard", Duration::from_secs(20), |s| {
            s.shards.iter().all(|sh| !sh.voters.contains(&1) && sh.leader_id != 0 && sh.leader_id != 1)
        })
        .await?;
        println!("right after the change: leads {:?}", leads(&s));
        let s = wait_via(&cluster, 2, "the new node to take a share", Duration::from_secs(20), |s| {
            let l = leads(s);
            l.get(&4).copied().unwrap_or(0) >= 2 && l.values().all(|n| *n <= 3)
        })
        .await?;
        println!("spread again: leads {:?}", leads(&s));
        let acks = load.finish().await?;
        println!("{}", acks.summary());
        assert!(acks.errors.is_empty(), "calls failed beyond the client's retries: {:?}", acks.errors);
        assert!(acks.created.len() > 100, "too little load got through: {} creates", acks.created.len());
        let remaining: Vec<String> = vec![cluster.node(2).grpc.clone(), cluster.node(3).grpc.clone(), grpc.clone()];
        verify(&Client::connect(&remaining)?, &acks).await
    }
    .await;
    result.map_err(|e| e.context(format!("{}\n{}", joiner.log_tail(30), cluster.logs())))
}

/// Polls node `via`'s status until `done` holds.
async fn wait_via(
    cluster: &DevCluster,
    via: u64,
    what: &str,
    within: Duration,
    done: impl Fn(&pb::StatusResponse) -> bool,
) -> anyhow::Result<pb::StatusResponse> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(s) = cluster.status_of(via).await
            && done(&s)
        {
            return Ok(s);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await; // status poll interval
    }
}

/// A raw gRPC client, so the test can send metadata the SDK never would.
async fn raw(addr: &str) -> anyhow::Result<tonic::transport::Channel> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?)
}

fn with_markers<T>(msg: T, search_shard: u32) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("vow-forwarded", MetadataValue::from_static("1"));
    r.metadata_mut().insert("vow-search-shard", search_shard.to_string().parse().expect("ascii"));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_markers_from_outside_are_ignored_and_the_route_service_checks_its_target() -> anyhow::Result<()> {
    use vow_api::v1::promises_client::PromisesClient;
    let cluster = DevCluster::up(3, &[])?;
    let status = spread(&cluster, 3, Duration::from_secs(30)).await?;
    let via = 1;
    let led_here: BTreeSet<u32> = status.shards.iter().filter(|s| s.leader_id == via).map(|s| s.shard_id).collect();
    let id = ids_on_every_shard("marked", 1).into_iter().find(|id| !led_here.contains(&shard_of(id))).expect("id");
    let mut promises = PromisesClient::new(raw(&cluster.node(via).grpc).await?);

    // "Already forwarded" from an outside client: the node still routes the write and the read
    // to the shard's leader (it used to refuse, skipping the forward).
    let sent_before = routed(&cluster, via, "sent")?;
    let created = promises.create(with_markers(create_req(&id, "k"), 0)).await?.into_inner();
    assert_eq!(created.promise.map(|p| p.id), Some(id.clone()));
    let read = promises
        .get(with_markers(pb::GetRequest { id: id.clone(), consistency: pb::Consistency::Linearizable as i32 }, 0))
        .await?
        .into_inner();
    assert_eq!(read.promise.map(|p| p.state), Some(pb::State::Pending as i32));
    assert_eq!(routed(&cluster, via, "sent")? - sent_before, 2, "the create and the read were routed");

    // "Search only shard N" from an outside client: every shard is searched.
    let ids = ids_on_every_shard("marked", 2);
    let c = cluster.client();
    for id in &ids {
        c.create(create_req(id, "k")).await?;
    }
    let only = shard_of(&ids[0]);
    let found = promises
        .search(with_markers(
            pb::SearchRequest { id_prefix: "marked-".into(), limit: 1000, ..Default::default() },
            only,
        ))
        .await?
        .into_inner();
    let shards: BTreeSet<u32> = found.promises.iter().map(|p| shard_of(&p.id)).collect();
    assert_eq!(shards.len(), SHARDS as usize, "searched only {shards:?}");

    // The node-to-node Route service refuses a request for another cluster, another node, or
    // a promise of another shard than the one named: no one reads one shard as another.
    let target = |shard_id: u32, node_id: u64, cluster_name: &str| {
        Some(wire::Target { shard_id, node_id, cluster_name: cluster_name.into() })
    };
    let owner = shard_of(&id);
    let leader = status.shards[owner as usize].leader_id;
    // The public port does not serve it at all; it lives on the peer port.
    let mut public_route = wire::route_client::RouteClient::new(raw(&cluster.node(leader).grpc).await?);
    let err = public_route
        .read(wire::ReadRequest { target: None, id: id.clone() })
        .await
        .expect_err("the Route service on the public port");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    let mut leader_route = wire::route_client::RouteClient::new(raw(&cluster.node(leader).peer).await?);
    let cluster_name = "vow";
    for (t, why) in [
        (target(owner, leader, "another-cluster"), "another cluster"),
        (target(owner, leader + 100, cluster_name), "another node"),
        (target((owner + 1) % SHARDS, leader, cluster_name), "another shard"),
        (target(SHARDS, leader, cluster_name), "no such shard"),
    ] {
        let reply = leader_route.read(wire::ReadRequest { target: t, id: id.clone() }).await?.into_inner();
        match reply.result {
            Some(wire::read_reply::Result::Refused(wire::Refusal {
                reason: Some(wire::refusal::Reason::Invalid(m)),
            })) => {
                println!("{why}: refused: {m}")
            }
            other => panic!("{why}: expected a refusal, got {other:?}"),
        }
    }
    // The right target reads it, so the refusals above were about the target alone.
    let reply = leader_route.read(wire::ReadRequest { target: target(owner, leader, cluster_name), id }).await?;
    assert!(matches!(reply.into_inner().result, Some(wire::read_reply::Result::Record(_))));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locate_and_shard_map_agree_with_the_placement_hash() -> anyhow::Result<()> {
    use vow_api::v1::cluster_client::ClusterClient;
    let cluster = DevCluster::up(3, &[])?;
    spread(&cluster, 3, Duration::from_secs(30)).await?;
    let mut api = ClusterClient::new(raw(&cluster.node(2).grpc).await?);
    // Node 2's map once it knows every shard's leader: a node that has not yet heard from a
    // leader just elected or moved there by the balancer answers 0 for it, as the proto allows.
    let start = Instant::now();
    let mut map = loop {
        let map = api.shard_map(pb::ShardMapRequest {}).await?.into_inner();
        if map.leaders.len() == SHARDS as usize && map.leaders.iter().all(|l| l.leader_id != 0) {
            break map;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "node 2 knows no leader for some shard: {map:?}");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll node 2's view
    };
    assert_eq!(map.shards, SHARDS);
    for (i, l) in map.leaders.iter().enumerate() {
        assert_eq!(l.shard_id, i as u32, "in shard order");
        assert_eq!(l.leader_grpc_addr, cluster.node(l.leader_id).grpc);
    }
    for id in ids_on_every_shard("locate", 2).iter().chain(&["{order-7}/a".to_string(), "ü{".to_string()]) {
        let at = api.locate(pb::LocateRequest { id: id.clone() }).await?.into_inner();
        assert_eq!(at.shard_id, shard_of(id), "{id}");
        if at.leader_id != map.leaders[at.shard_id as usize].leader_id {
            // The balancer moved that shard's leader since: the map says so too now.
            map = api.shard_map(pb::ShardMapRequest {}).await?.into_inner();
        }
        assert_eq!(at.leader_id, map.leaders[at.shard_id as usize].leader_id, "{id}");
    }
    let bad = api.locate(pb::LocateRequest { id: String::new() }).await.expect_err("an empty id");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    // A client acting on the map reaches the leader directly: no leader hint on the reply.
    let id = "locate-direct";
    let shard = shard_of(id) as usize;
    let mut direct =
        vow_api::v1::promises_client::PromisesClient::new(raw(&map.leaders[shard].leader_grpc_addr).await?);
    let reply = direct.create(create_req(id, "k")).await?;
    assert!(reply.metadata().get("vow-leader-addr").is_none(), "the leader forwarded its own shard's write");
    Ok(())
}
