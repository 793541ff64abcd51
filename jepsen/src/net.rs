//! Hosts as Linux network namespaces on one bridge, and the faults done to their network.
//!
//! Node `i` lives in namespace `vowj-n<i>` with address `10.77.0.<i>/24` on its `eth0`, a veth
//! whose peer `vowj-v<i>` is enslaved to the bridge `vowj-br0` (10.77.0.254 in the root
//! namespace). Clients run in the root namespace and reach every node through the bridge.
//! Partitions drop packets from the other side's addresses with iptables inside each namespace,
//! so client traffic (from the bridge address) is never cut.

use std::process::Command;

use anyhow::{Context, bail};

pub const BRIDGE: &str = "vowj-br0";
pub const BRIDGE_ADDR: &str = "10.77.0.254";
const PREFIX: &str = "vowj-";

pub fn ns(node: u64) -> String {
    format!("{PREFIX}n{node}")
}

pub fn addr(node: u64) -> String {
    format!("10.77.0.{node}")
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn in_ns(node: u64, args: &[&str]) -> anyhow::Result<()> {
    let name = ns(node);
    let mut all = vec!["ip", "netns", "exec", name.as_str()];
    all.extend_from_slice(args);
    run(&all)
}

/// Where runs and cleanups on one machine take turns (see [`exclusive`]).
const LOCK: &str = "/run/lock/vow-jepsen.lock";

/// Holds the machine's vow-jepsen lock until dropped. Every run uses the same namespace, link and
/// address names, so a second run (or a cleanup) started during a run would take over or delete
/// its nodes, and each would record the other's writes: it must refuse instead.
pub fn exclusive() -> anyhow::Result<std::fs::File> {
    let path = std::path::Path::new(LOCK);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {LOCK}"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("another vow-jepsen run or cleanup holds {LOCK}: runs on one machine share their namespaces")
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {LOCK}")),
    }
}

/// Names of namespaces and links an earlier run left behind.
pub fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split_whitespace().next().filter(|n| n.starts_with(PREFIX)) {
                found.push(format!("namespace {name}"));
            }
        }
    }
    if Command::new("ip").args(["link", "show", BRIDGE]).output().is_ok_and(|o| o.status.success()) {
        found.push(format!("bridge {BRIDGE}"));
    }
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or(""))
                && name.starts_with(PREFIX)
                && name != BRIDGE
            {
                found.push(format!("link {name}"));
            }
        }
    }
    let mut check = vec!["-C"];
    check.extend_from_slice(&FORWARD_RULE_ADD[1..]);
    if Command::new("iptables").args(&check).output().is_ok_and(|o| o.status.success()) {
        found.push("iptables FORWARD rule for the bridge".into());
    }
    found.extend(crate::disks::leftovers().iter().map(|m| format!("vow-lazyfs mount {}", m.display())));
    found
}

/// Removes every namespace and link of ours, killing whatever runs inside the namespaces.
pub fn cleanup() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split_whitespace().next().filter(|n| n.starts_with(PREFIX)) {
                if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
                    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-CONT", pid]).status();
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                }
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
    // A namespace whose processes are still exiting outlives `ip netns del`, and so does its
    // veth pair: delete the host ends, which takes both ends with them (a soak once found a
    // node's link still there 10 s later and refused six runs).
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or(""))
                && name.starts_with(PREFIX)
            {
                let _ = Command::new("ip").args(["link", "del", name]).output();
            }
        }
    }
    // Remove every copy of our forwarding rule (a crashed run may have left more than one).
    while Command::new("iptables").args(FORWARD_RULE_DEL).output().is_ok_and(|o| o.status.success()) {}
    // The processes are dead, so a disk mount left behind is busy no more.
    crate::disks::cleanup();
    // The kernel tears a deleted namespace (and the veth peers in it) down asynchronously; wait
    // for that, so the next run does not trip over links that are still going away.
    for _ in 0..600 {
        if leftovers().is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50)); // poll the kernel's teardown
    }
}

/// With br_netfilter loaded, bridged packets traverse the root namespace's FORWARD chain, whose
/// policy a Docker host sets to DROP; this rule lets our bridge's own traffic through.
const FORWARD_RULE_ADD: &[&str] = &["-I", "FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"];
const FORWARD_RULE_DEL: &[&str] = &["-D", "FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"];

/// Creates the bridge and one namespace per node.
pub fn setup(nodes: u64) -> anyhow::Result<()> {
    run(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
    run(&["ip", "addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", BRIDGE])?;
    run(&["ip", "link", "set", BRIDGE, "up"])?;
    let mut add = vec!["iptables"];
    add.extend_from_slice(FORWARD_RULE_ADD);
    run(&add)?;
    for i in 1..=nodes {
        let name = ns(i);
        let host_side = format!("{PREFIX}v{i}");
        run(&["ip", "netns", "add", &name])?;
        run(&["ip", "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &name])?;
        run(&["ip", "link", "set", &host_side, "master", BRIDGE])?;
        run(&["ip", "link", "set", &host_side, "up"])?;
        in_ns(i, &["ip", "addr", "add", &format!("{}/24", addr(i)), "dev", "eth0"])?;
        in_ns(i, &["ip", "link", "set", "eth0", "up"])?;
        in_ns(i, &["ip", "link", "set", "lo", "up"])?;
    }
    Ok(())
}

/// Makes `node` drop every packet from the nodes in `from`.
pub fn block(node: u64, from: &[u64]) -> anyhow::Result<()> {
    for f in from {
        in_ns(node, &["iptables", "-A", "INPUT", "-s", &addr(*f), "-j", "DROP"])?;
    }
    Ok(())
}

/// Cuts each link `(a, b)` in both directions: TCP needs packets both ways, so a rule on one
/// side only would still break the link for connections, and hide which links were meant to work.
pub fn cut(links: &[(u64, u64)]) -> anyhow::Result<()> {
    for &(a, b) in links {
        block(a, &[b])?;
        block(b, &[a])?;
    }
    Ok(())
}

/// Cuts the cluster into the given groups: no packet crosses between groups.
pub fn partition(groups: &[Vec<u64>]) -> anyhow::Result<()> {
    for (gi, g) in groups.iter().enumerate() {
        let others: Vec<u64> =
            groups.iter().enumerate().filter(|(j, _)| *j != gi).flat_map(|(_, o)| o.clone()).collect();
        for n in g {
            block(*n, &others)?;
        }
    }
    Ok(())
}

/// Drops a random share of the packets `node` receives (netem is not available in every
/// kernel; iptables' statistic match is).
pub fn lossy(node: u64, probability: f64) -> anyhow::Result<()> {
    let p = format!("{probability:.3}");
    in_ns(node, &["iptables", "-A", "INPUT", "-m", "statistic", "--mode", "random", "--probability", &p, "-j", "DROP"])
}

/// Delays (and reorders) `node`'s outgoing packets with netem when the kernel has it, or
/// throttles its link with a token bucket (queueing delay) when it does not. Returns what it did.
pub fn slow(node: u64, delay_ms: u64) -> anyhow::Result<String> {
    let d = format!("{delay_ms}ms");
    let jitter = format!("{}ms", delay_ms / 2);
    if in_ns(node, &["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", &d, &jitter, "reorder", "10%"])
        .is_ok()
    {
        return Ok(format!("netem delay {d}±{jitter}, 10% reordered"));
    }
    in_ns(node, &["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "2mbit", "burst", "8kb", "latency", &d])?;
    Ok(format!("tbf 2mbit (netem unavailable), queueing up to {d}"))
}

/// Removes every rule and qdisc from every node.
pub fn heal(nodes: u64) -> anyhow::Result<()> {
    for i in 1..=nodes {
        in_ns(i, &["iptables", "-F", "INPUT"])?;
        let _ = in_ns(i, &["tc", "qdisc", "del", "dev", "eth0", "root"]);
    }
    Ok(())
}
