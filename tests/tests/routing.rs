//! The client goes straight to the shard leader: three nodes with eight shards, a client that is
//! given one node, and the per-method request counters of every node's `/metrics` showing that
//! each node received the calls of the ids whose shard it leads, not forwards from a node that
//! does not. After leadership moves, a stale map costs a hop, never an error.
//!
//! A node counts every call it receives from a client, and a call it forwards to the leader
//! (over the internal Route RPC) is not counted again there. So a forward shows as one call too
//! many at the forwarding node and one too few at the leader, and forwards can cancel out in
//! per-node counts: a client that merely followed hints would send each create to the leader of
//! the previous call's shard, and every node would still count its share. Each round therefore
//! reads an anchor promise between creates, which pulls such a client back to the anchor's
//! leader every time: there, only a client that routes by the map matches the counts.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use vow_client::{Client, pb};
use vow_tests::{DevCluster, create_req, value};

const NODES: u64 = 3;
const SHARDS: u32 = 8;
/// Calls that may reach a non-leader in the first round: those sent before the client's
/// lazily fetched shard map arrived.
const FIRST_CALL_FORWARDS: u64 = 8;

/// The leader of each shard, once every shard has one and all nodes agree on it.
async fn leaders(cluster: &DevCluster) -> anyhow::Result<Vec<u64>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut views = Vec::new();
        for n in 1..=NODES {
            views.push(
                cluster.status_of(n).await.ok().map(|s| s.shards.iter().map(|sh| sh.leader_id).collect::<Vec<_>>()),
            );
        }
        if let Some(Some(first)) = views.first()
            && first.len() == SHARDS as usize
            && first.iter().all(|l| *l != 0)
            && views.iter().all(|v| v.as_ref() == Some(first))
        {
            return Ok(first.clone());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no agreed leader for every shard: {views:?}\n{}", cluster.logs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // status poll interval
    }
}

/// Moves leaderships until shard `s` is led by `want[s]`.
async fn lead_as(cluster: &DevCluster, client: &Client, want: &[u64]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = leaders(cluster).await?;
        if now == want {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("leaders are {now:?}, wanted {want:?}\n{}", cluster.logs());
        }
        for node in 1..=NODES {
            let shards: Vec<u32> =
                (0..SHARDS).filter(|&s| want[s as usize] == node && now[s as usize] != node).collect();
            if !shards.is_empty() {
                // A transfer can race an election; the loop looks again and retries.
                let _ = client.transfer_leader_of(node, &shards).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // let the transfers take effect before looking
    }
}

/// A node's request counter for `method`, over all outcomes.
fn requests(cluster: &DevCluster, node: u64, method: &str) -> anyhow::Result<u64> {
    let prefix = format!("vow_requests_total{{node=\"{node}\",method=\"{method}\",");
    let text = cluster.metrics_of(node)?;
    let values: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).map(|v| v as u64))
        .collect::<Option<_>>()
        .with_context(|| format!("node {node}: unreadable {method} counter"))?;
    ensure!(!values.is_empty(), "node {node} exports no vow_requests_total for {method}");
    Ok(values.iter().sum())
}

/// Every node's create, resolve and get counters.
fn counters(cluster: &DevCluster) -> anyhow::Result<BTreeMap<(u64, &'static str), u64>> {
    let mut out = BTreeMap::new();
    for node in 1..=NODES {
        for method in ["create", "resolve", "get"] {
            out.insert((node, method), requests(cluster, node, method)?);
        }
    }
    Ok(out)
}

/// Creates, resolves and reads back each id, and reads `anchor` after each; every call must
/// succeed.
async fn round(client: &Client, ids: &[String], anchor: &str) -> anyhow::Result<()> {
    for id in ids {
        client.create(create_req(id, &format!("c-{id}"))).await.with_context(|| format!("create {id}"))?;
        client.resolve(id, value(id), Some(format!("r-{id}"))).await.with_context(|| format!("resolve {id}"))?;
        let p = client.get(id).await.with_context(|| format!("get {id}"))?;
        ensure!(p.state == pb::State::Resolved as i32 && p.value.map(|v| v.data) == Some(id.as_bytes().to_vec()));
        client.get(anchor).await.with_context(|| format!("get {anchor}"))?;
    }
    Ok(())
}

/// Each id's shard, as Locate answers.
async fn locate(client: &Client, ids: &[String]) -> anyhow::Result<Vec<u32>> {
    let mut shards = Vec::with_capacity(ids.len());
    for id in ids {
        let l = client.locate(id).await.with_context(|| format!("locate {id}"))?;
        ensure!(l.shard_id < SHARDS, "{id}: shard {}", l.shard_id);
        shards.push(l.shard_id);
    }
    Ok(shards)
}

/// The first of the ids of the form `{prefix}-{k}` that Locate places on `shard`.
async fn id_on(client: &Client, prefix: &str, shard: u32) -> anyhow::Result<String> {
    for k in 0..1000 {
        let id = format!("{prefix}-{k}");
        if client.locate(&id).await?.shard_id == shard {
            return Ok(id);
        }
    }
    bail!("no id {prefix}-* on shard {shard}")
}

/// What one round did on each node, against what going straight to the leaders means.
struct Tally {
    /// Per node: (calls of `method` received, ids whose shard it led).
    per_node: BTreeMap<u64, (u64, u64)>,
}

impl Tally {
    fn new(
        before: &BTreeMap<(u64, &'static str), u64>,
        after: &BTreeMap<(u64, &'static str), u64>,
        method: &'static str,
        shards: impl IntoIterator<Item = u32>,
        leaders: &[u64],
    ) -> Tally {
        let mut per_node: BTreeMap<u64, (u64, u64)> =
            (1..=NODES).map(|n| (n, (after[&(n, method)] - before[&(n, method)], 0))).collect();
        for shard in shards {
            per_node.get_mut(&leaders[shard as usize]).expect("a node").1 += 1;
        }
        Tally { per_node }
    }

    /// Calls that reached a node beyond the ids it leads: forwards.
    fn extra(&self) -> u64 {
        self.per_node.values().map(|(got, led)| got.saturating_sub(*led)).sum()
    }

    /// Calls a leader did not receive itself (they came to it forwarded).
    fn missing(&self) -> u64 {
        self.per_node.values().map(|(got, led)| led.saturating_sub(*got)).sum()
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> =
            self.per_node.iter().map(|(n, (got, led))| format!("node {n}: {got} (leads {led})")).collect();
        write!(f, "{}", parts.join(", "))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_given_one_node_sends_each_call_to_its_shards_leader() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let cluster = DevCluster::up_with(NODES as usize, &[], &["--shards", &SHARDS.to_string()])?;
    let admin = cluster.client();
    // Spread the leaderships (node 1: shards 0, 3, 6; node 2: 1, 4, 7; node 3: 2, 5), so that
    // following one hint cannot look like routing.
    let spread: Vec<u64> = (0..u64::from(SHARDS)).map(|s| s % NODES + 1).collect();
    lead_as(&cluster, &admin, &spread).await?;

    // Placement as the cluster computes it (Locate), for ids covering every shard.
    let ids: Vec<String> = (0..400).map(|n| format!("route-{n}")).collect();
    let shard_of = locate(&admin, &ids).await?;
    let covered: std::collections::BTreeSet<u32> = shard_of.iter().copied().collect();
    ensure!(covered.len() == SHARDS as usize, "400 ids cover only shards {covered:?}");
    let map = admin.shard_map().await?;
    ensure!(map.shards == SHARDS, "ShardMap says {} shards", map.shards);
    ensure!(map.leaders.iter().map(|l| l.leader_id).collect::<Vec<_>>() == spread, "ShardMap {map:?}");
    // The anchor lives on shard 6, which node 1 leads throughout.
    let anchor = id_on(&admin, "anchor", 6).await?;
    admin.create(create_req(&anchor, "c-anchor")).await?;

    // The client is given node 3 only, which leads two shards of eight. Its map loads lazily.
    let client = cluster.client_of(3);
    let mut now = spread.clone();
    // Round 1 with a fresh client; then leaderships move under it, one shard at a time (the
    // nodes keep leadership balanced, at most ceil(8 / 3) = 3 shards each, so a move must keep
    // it so; and a move to a node that also loses one would hide the hop in per-node counts).
    // The map is then stale for that shard: its first call goes to the old leader, which
    // forwards it and names the new one, correcting the entry. A hop, never an error; in the
    // last round the map has converged.
    for (r, moving) in [(1, None), (2, Some((0, 3))), (3, Some((1, 1))), (4, None)] {
        let ids = if r == 1 { ids.clone() } else { (0..200).map(|k| format!("route-{r}-{k}")).collect() };
        let shard_of = if r == 1 { shard_of.clone() } else { locate(&admin, &ids).await? };
        if let Some((shard, to)) = moving {
            now[shard] = to;
            lead_as(&cluster, &admin, &now).await?;
        }
        let before = counters(&cluster)?;
        round(&client, &ids, &anchor).await?;
        let after = counters(&cluster)?;
        ensure!(leaders(&cluster).await? == now, "a leadership moved during round {r}");
        let anchors = std::iter::repeat_n(6, ids.len());
        for method in ["create", "resolve", "get"] {
            let shards = shard_of.iter().copied().chain(anchors.clone().filter(|_| method == "get"));
            let t = Tally::new(&before, &after, method, shards, &now);
            let what = match moving {
                Some((shard, to)) => format!("shard {shard} just moved to node {to}"),
                None if r == 1 => "a new client".into(),
                None => "no move".into(),
            };
            eprintln!("round {r} ({what}), {method}s received: {t}");
            // Round 1: the calls before the map arrived. A moved shard: one hop, for its first
            // call (a create). Anywhere, a retried attempt may add one.
            let (least, most) = match moving {
                None if r == 1 => (0, FIRST_CALL_FORWARDS),
                Some(_) if method == "create" => (1, 2),
                _ => (0, 1),
            };
            ensure!(
                (least..=most).contains(&t.extra()) && t.missing() <= most,
                "round {r}: {method}s did not go to the leaders: {} beyond the leaders' share, {} missing, \
                 want {least}..={most}: {t}",
                t.extra(),
                t.missing()
            );
        }
    }
    eprintln!("routing test took {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
