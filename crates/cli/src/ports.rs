//! Loopback ports for the processes `vow dev up` and `vow bench` start.
//!
//! A port found by binding `127.0.0.1:0` comes from the kernel's ephemeral range, the same range
//! the kernel takes the source port of every outgoing connection from. Between finding it and
//! the child binding it — or between a node's kill and its restart on the same port — any
//! connection on the machine may take it, and the node fails with "address in use". Ports here
//! are picked at random *below* that range, where the kernel never hands out ports on its own;
//! only another picker of this kind could take one, and the bind check plus a random start make
//! that rare.

use std::net::TcpListener;

use anyhow::Context;

/// The lowest port we pick from.
const LOWEST: u16 = 10_000;

/// `n` distinct loopback ports, each free when picked.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let top = ephemeral_low().unwrap_or(32_768);
    // Held until all are picked, so one call never returns a port twice.
    let mut held = Vec::with_capacity(n);
    if top > LOWEST + 1_000 {
        for _ in 0..n * 100 {
            if held.len() == n {
                break;
            }
            let port = rand::random_range(LOWEST..top);
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                held.push(l);
            }
        }
    }
    // A kernel whose ephemeral range starts low leaves no room below it: take what it gives.
    while held.len() < n {
        held.push(TcpListener::bind("127.0.0.1:0").context("finding a free port")?);
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// One free loopback port; see [`free_ports`].
pub fn free_port() -> anyhow::Result<u16> {
    Ok(free_ports(1)?[0])
}

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
fn ephemeral_low() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let ports = free_ports(50).expect("ports");
        let unique: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(unique.len(), 50, "{ports:?}");
        if let Some(low) = ephemeral_low().filter(|l| *l > LOWEST + 1_000) {
            assert!(ports.iter().all(|p| (LOWEST..low).contains(p)), "{ports:?} vs {low}");
        }
        for p in ports {
            TcpListener::bind(("127.0.0.1", p)).expect("still free");
        }
    }
}
