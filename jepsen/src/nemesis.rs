//! Faults: a seeded schedule of fault windows, each applied, held, and healed, recorded as
//! nemesis events. Everything is healed before the final reads.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use crate::history::NemesisEvent;
use crate::hosts::Hosts;
use crate::net;

pub const ALL: &[&str] = &["kill", "pause", "partition", "netem", "membership", "transfer"];

/// One planned fault.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    KillRandom,
    KillLeader,
    KillMajority,
    PauseRandom,
    PauseLeader,
    IsolateOne,
    IsolateLeader,
    RandomHalves,
    MajorityRing,
    Bridge,
    Loss,
    Delay,
    RemoveAndAdd,
    TransferLeader,
}

/// The faults a nemesis name enables.
fn faults_of(name: &str) -> &'static [Fault] {
    match name {
        "kill" => &[Fault::KillRandom, Fault::KillLeader, Fault::KillMajority],
        "pause" => &[Fault::PauseRandom, Fault::PauseLeader],
        "partition" => {
            &[Fault::IsolateOne, Fault::IsolateLeader, Fault::RandomHalves, Fault::MajorityRing, Fault::Bridge]
        }
        "netem" => &[Fault::Loss, Fault::Delay],
        "membership" => &[Fault::RemoveAndAdd],
        "transfer" => &[Fault::TransferLeader],
        _ => &[],
    }
}

/// A fault window: start after `at`, hold for `hold`, with its own random choices.
#[derive(Debug, Clone)]
pub struct Window {
    pub at: Duration,
    pub hold: Duration,
    pub fault: Fault,
    /// Seeds the node choices of this fault, so a replay picks the same nodes.
    pub seed: u64,
}

/// Plans fault windows over `time_limit` from `seed`: a quiet start, then fault windows of 2–6 s
/// separated by 1–4 s of calm, ending 3 s before the limit.
pub fn plan(enabled: &[String], time_limit: Duration, seed: u64) -> anyhow::Result<Vec<Window>> {
    let mut faults = Vec::new();
    for name in enabled {
        let f = faults_of(name);
        if f.is_empty() {
            anyhow::bail!("unknown nemesis {name:?} (known: {})", ALL.join(", "));
        }
        faults.extend_from_slice(f);
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321);
    let mut windows = Vec::new();
    let mut t = Duration::from_secs(2);
    let end = time_limit.saturating_sub(Duration::from_secs(3));
    while !faults.is_empty() {
        let hold = Duration::from_millis(rng.random_range(2_000..6_000));
        if t + hold > end {
            break;
        }
        let fault = faults.choose(&mut rng).cloned().unwrap_or(Fault::KillRandom);
        windows.push(Window { at: t, hold, fault, seed: rng.random() });
        t += hold + Duration::from_millis(rng.random_range(1_000..4_000));
    }
    Ok(windows)
}

/// Applies faults to the hosts and records what it did.
#[derive(Debug, Default)]
pub struct Nemesis {
    pub events: Vec<NemesisEvent>,
    removed: Vec<u64>,
}

async fn leader(hosts: &Hosts) -> Option<u64> {
    for id in hosts.ids() {
        if let Ok(c) = hosts.client_of(id)
            && let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), c.status()).await
            && let Some(l) = s.shards.first().map(|s| s.leader_id).filter(|l| *l != 0)
        {
            return Some(l);
        }
    }
    None
}

impl Nemesis {
    fn record(&mut self, at_ns: u64, action: &str, detail: String) {
        self.events.push(NemesisEvent { at_ns, action: action.to_owned(), detail });
    }

    /// Starts a fault; `now_ns` stamps the event.
    pub async fn apply(&mut self, hosts: &mut Hosts, w: &Window, now_ns: u64) -> anyhow::Result<()> {
        let mut rng = StdRng::seed_from_u64(w.seed);
        let mut ids = hosts.ids();
        ids.shuffle(&mut rng);
        let n = ids.len();
        let majority = n / 2 + 1;
        let leader = match w.fault {
            Fault::KillLeader
            | Fault::PauseLeader
            | Fault::IsolateLeader
            | Fault::TransferLeader
            | Fault::RemoveAndAdd => leader(hosts).await,
            _ => None,
        };
        let one = leader.unwrap_or(ids[0]);
        match &w.fault {
            Fault::KillRandom | Fault::KillLeader => {
                let victim = if w.fault == Fault::KillLeader { one } else { ids[0] };
                hosts.kill(victim)?;
                self.record(
                    now_ns,
                    "kill",
                    format!("node {victim}{}", if Some(victim) == leader { " (leader)" } else { "" }),
                );
            }
            Fault::KillMajority => {
                let victims: Vec<u64> = ids[..majority].to_vec();
                for v in &victims {
                    hosts.kill(*v)?;
                }
                self.record(now_ns, "kill", format!("majority {victims:?}"));
            }
            Fault::PauseRandom | Fault::PauseLeader => {
                let victim = if w.fault == Fault::PauseLeader { one } else { ids[0] };
                hosts.pause(victim)?;
                self.record(now_ns, "pause", format!("node {victim}"));
            }
            Fault::IsolateOne | Fault::IsolateLeader => {
                let victim = if w.fault == Fault::IsolateLeader { one } else { ids[0] };
                let rest: Vec<u64> = hosts.ids().into_iter().filter(|i| *i != victim).collect();
                net::partition(&[vec![victim], rest.clone()])?;
                self.record(now_ns, "partition", format!("isolate {victim} from {rest:?}"));
            }
            Fault::RandomHalves => {
                let (a, b) = ids.split_at(n / 2);
                net::partition(&[a.to_vec(), b.to_vec()])?;
                self.record(now_ns, "partition", format!("halves {a:?} | {b:?}"));
            }
            Fault::MajorityRing => {
                // Each node sees a majority, but no two nodes see the same one.
                for (i, node) in ids.iter().enumerate() {
                    let visible: Vec<u64> = (0..majority).map(|k| ids[(i + k) % n]).collect();
                    let blocked: Vec<u64> = ids.iter().copied().filter(|x| !visible.contains(x)).collect();
                    net::block(*node, &blocked)?;
                }
                self.record(now_ns, "partition", format!("majority ring over {ids:?}"));
            }
            Fault::Bridge => {
                // Two halves that only talk through one bridging node.
                let bridge = ids[0];
                let rest = &ids[1..];
                let (a, b) = rest.split_at(rest.len() / 2);
                for x in a {
                    net::block(*x, b)?;
                }
                for x in b {
                    net::block(*x, a)?;
                }
                self.record(now_ns, "partition", format!("bridge {bridge} between {a:?} and {b:?}"));
            }
            Fault::Loss => {
                let victims: Vec<u64> = ids[..majority].to_vec();
                for v in &victims {
                    net::lossy(*v, 0.2)?;
                }
                self.record(now_ns, "netem", format!("20% packet loss on {victims:?}"));
            }
            Fault::Delay => {
                let mut done = Vec::new();
                for v in &ids[..majority] {
                    done.push(format!("{v}: {}", net::slow(*v, 50)?));
                }
                self.record(now_ns, "netem", done.join("; "));
            }
            Fault::RemoveAndAdd => {
                // Remove a follower (removing the leader is a different, rarer operation).
                let victim = ids.iter().copied().find(|i| Some(*i) != leader).unwrap_or(ids[0]);
                let c = hosts.client(Duration::from_secs(10))?;
                match c.remove_node(victim).await {
                    Ok(_) => {
                        self.removed.push(victim);
                        self.record(now_ns, "remove", format!("node {victim}"));
                    }
                    Err(e) => self.record(now_ns, "remove-failed", format!("node {victim}: {e}")),
                }
            }
            Fault::TransferLeader => {
                let to = ids.iter().copied().find(|i| Some(*i) != leader).unwrap_or(ids[0]);
                let c = hosts.client(Duration::from_secs(5))?;
                let r = c.transfer_leader(to).await;
                self.record(
                    now_ns,
                    "transfer",
                    format!("leader {leader:?} -> {to}: {}", r.map_or_else(|e| e.to_string(), |_| "ok".into())),
                );
            }
        }
        Ok(())
    }

    /// Ends every fault: network rules, paused and dead processes, removed members.
    pub async fn heal(&mut self, hosts: &mut Hosts, now_ns: u64) -> anyhow::Result<()> {
        net::heal(hosts.ids().len() as u64)?;
        let restarted = hosts.heal()?;
        let mut detail = format!("network healed; processes resumed/started: {restarted:?}");
        for id in std::mem::take(&mut self.removed) {
            let c = hosts.client(Duration::from_secs(30))?;
            let mut outcome = String::from("not attempted");
            for _ in 0..10 {
                match c.add_node(id, &crate::hosts::grpc(id)).await {
                    Ok(_) => {
                        outcome = "ok".into();
                        break;
                    }
                    Err(e) => outcome = e.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(500)).await; // the cluster may still be electing
            }
            detail.push_str(&format!("; node {id} re-added: {outcome}"));
        }
        self.record(now_ns, "heal", detail);
        Ok(())
    }
}
