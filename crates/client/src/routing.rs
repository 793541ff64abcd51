//! Which node an attempt goes to: the endpoints the client knows, and a cached shard map that
//! sends each call about one promise straight to the leader of the promise's shard.
//!
//! Everything here is bookkeeping under the client's lock, with the time passed in, so the
//! decisions are unit-tested without a cluster. The map is only ever a first guess: a node that
//! does not lead the shard forwards the call and names the leader (`vow-leader-addr`), which
//! corrects the entry, so a stale map costs a hop, never a wrong answer; and an entry whose
//! node failed is dropped, so the call falls back to the endpoint rotation the client has
//! always used (which is also all it does while it has no map).

use std::time::Duration;

use tokio::time::Instant;
use vow_core::{PromiseId, ShardId};

use crate::pb;
use crate::transport::{H2Channel, Security};

/// The shard map is fetched at most this often: lazily on first need, again when it looks stale.
pub(crate) const MAP_REFRESH_EVERY: Duration = Duration::from_secs(1);
/// After every node asked answered that it has no ShardMap (a vowd older than the RPC), how long
/// before the client asks again (a rolling upgrade may add it).
pub(crate) const MAP_UNSUPPORTED_RETRY: Duration = Duration::from_secs(30);
/// For this long after an endpoint failed, a fetched map that names it as a shard's leader is
/// not believed for that shard: the answering node's view may predate the failure, and a call
/// routed there would pay for the same failure again (up to a connect timeout).
pub(crate) const SUSPECT_FOR: Duration = Duration::from_secs(2);
/// The same for an address that has never answered this client: most likely one it cannot
/// reach at all — a name that only resolves inside the cluster's network (a pod's DNS name, a
/// container's), handed out in maps and hints. Calls keep going through the endpoints the
/// client was given (which forward), and try that address again only this rarely.
pub(crate) const SUSPECT_NEVER_REACHED_FOR: Duration = Duration::from_secs(30);

/// The endpoints (given by the caller or learned from hints and the map), the rotation among
/// them, and the shard map.
#[derive(Debug)]
pub(crate) struct Endpoints {
    pub(crate) addrs: Vec<String>,
    channels: Vec<H2Channel>,
    /// When each endpoint last failed an attempt without naming a leader.
    failed_at: Vec<Option<Instant>>,
    /// Whether each endpoint has ever answered an attempt.
    reached: Vec<bool>,
    /// Index of the endpoint to try first when the map does not decide: the last one that
    /// answered or the last leader hint.
    pub(crate) preferred: usize,
    map: Option<ShardMap>,
    refresh: Refresh,
    /// How channels to endpoints learned later (leader hints) are secured.
    security: Security,
}

/// The leader of each shard, as far as the client knows; `leaders.len()` is the shard count.
#[derive(Debug)]
struct ShardMap {
    leaders: Vec<Entry>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    /// Index into [`Endpoints::addrs`]; `None` when no leader is known.
    leader: Option<usize>,
    /// [`Refresh::changes`] when the entry was last set: a fetch that started earlier does not
    /// overwrite it with what may be an older view.
    changed: u64,
}

#[derive(Debug, Default)]
struct Refresh {
    in_flight: bool,
    not_before: Option<Instant>,
    /// Counts entry changes learned from calls (hints, failures).
    changes: u64,
}

/// What a fetch of the shard map needs: where to ask, in order, and the change count when it
/// started.
#[derive(Debug)]
pub(crate) struct MapFetch {
    pub(crate) since: u64,
    pub(crate) channels: Vec<H2Channel>,
}

/// Where one attempt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Choice {
    pub(crate) index: usize,
    /// The shard map chose it (it is the shard's cached leader).
    pub(crate) routed: bool,
}

impl Endpoints {
    /// Endpoints for `addrs` (already normalised, at least one); fails for a malformed address.
    pub(crate) fn new(addrs: Vec<String>, security: Security) -> Result<Endpoints, String> {
        let channels =
            addrs.iter().map(|a| H2Channel::with_security(a, security.clone())).collect::<Result<Vec<_>, _>>()?;
        Ok(Endpoints {
            security,
            failed_at: vec![None; addrs.len()],
            reached: vec![false; addrs.len()],
            addrs,
            channels,
            preferred: 0,
            map: None,
            refresh: Refresh::default(),
        })
    }

    pub(crate) fn channel(&self, index: usize) -> H2Channel {
        self.channels[index].clone()
    }

    /// The index of `addr` (normalised), adding it with a new, lazily connected channel when it
    /// is new; `None` for an address that is not `host:port`.
    fn index_of(&mut self, addr: &str) -> Option<usize> {
        if let Some(i) = self.addrs.iter().position(|a| a == addr) {
            return Some(i);
        }
        let channel = H2Channel::with_security(addr, self.security.clone()).ok()?;
        self.addrs.push(addr.to_owned());
        self.channels.push(channel);
        self.failed_at.push(None);
        self.reached.push(false);
        Some(self.addrs.len() - 1)
    }

    /// The shard of `id` by the cached map's shard count; `None` while there is no map.
    pub(crate) fn shard_of(&self, id: &str) -> Option<ShardId> {
        let shards = u32::try_from(self.map.as_ref()?.leaders.len()).ok()?;
        Some(ShardId::for_promise(&PromiseId::new_unchecked(id), shards))
    }

    fn leader_of(&self, shard: ShardId) -> Option<usize> {
        self.map.as_ref()?.leaders.get(shard.0 as usize)?.leader
    }

    /// The first try of a call about a promise (`rotate` 0) goes to its shard's cached leader;
    /// everything else goes round the endpoints from the preferred one, as without a map.
    pub(crate) fn choose(&self, shard: Option<ShardId>, rotate: u32) -> Choice {
        if rotate == 0
            && let Some(index) = shard.and_then(|s| self.leader_of(s))
        {
            return Choice { index, routed: true };
        }
        Choice { index: (self.preferred + rotate as usize) % self.channels.len(), routed: false }
    }

    /// Whether a call about `shard` should have the map fetched: there is none yet, or it knows
    /// no leader for the shard.
    pub(crate) fn map_looks_stale(&self, shard: Option<ShardId>) -> bool {
        match shard {
            None => self.map.is_none(),
            Some(s) => self.leader_of(s).is_none(),
        }
    }

    /// An attempt at `index` succeeded without a leader hint.
    pub(crate) fn answered(&mut self, index: usize) {
        self.preferred = index;
        self.failed_at[index] = None;
        self.reached[index] = true;
    }

    /// An attempt at `index` succeeded and named another node as the leader to prefer.
    pub(crate) fn reached(&mut self, index: usize) {
        self.failed_at[index] = None;
        self.reached[index] = true;
    }

    /// A node named the leader at `addr` (normalised): try it first from now on and, for a call
    /// about `shard`, record it as that shard's leader. False when `addr` is not an address, or
    /// one that failed lately (see [`SUSPECT_FOR`]): following it would fail the next call.
    pub(crate) fn follow_hint(&mut self, addr: &str, shard: Option<ShardId>, now: Instant) -> bool {
        let Some(index) = self.index_of(addr) else { return false };
        if self.suspect(index, now) {
            return false;
        }
        self.preferred = index;
        if let Some(s) = shard {
            self.set_leader(s, Some(index));
        }
        true
    }

    /// An attempt at `index` failed without naming a leader. If the map had chosen it for
    /// `shard`, the entry is dropped: the shard's calls go round the endpoints until a hint or a
    /// fresh map names the leader again.
    pub(crate) fn failed(&mut self, index: usize, shard: Option<ShardId>, now: Instant) {
        self.failed_at[index] = Some(now);
        if let Some(s) = shard
            && self.leader_of(s) == Some(index)
        {
            self.set_leader(s, None);
        }
    }

    fn set_leader(&mut self, shard: ShardId, leader: Option<usize>) {
        self.refresh.changes += 1;
        let changed = self.refresh.changes;
        if let Some(entry) = self.map.as_mut().and_then(|m| m.leaders.get_mut(shard.0 as usize)) {
            *entry = Entry { leader, changed };
        }
    }

    /// Starts a fetch of the map unless one is running or one started within
    /// [`MAP_REFRESH_EVERY`]; the caller then fetches and reports with [`Endpoints::end_refresh`].
    pub(crate) fn start_refresh(&mut self, now: Instant) -> Option<MapFetch> {
        if self.refresh.in_flight || self.refresh.not_before.is_some_and(|t| now < t) {
            return None;
        }
        self.refresh.in_flight = true;
        self.refresh.not_before = Some(now + MAP_REFRESH_EVERY);
        let n = self.channels.len();
        let channels = (0..n).map(|k| self.channels[(self.preferred + k) % n].clone()).collect();
        Some(MapFetch { since: self.refresh.changes, channels })
    }

    /// A fetch ended, with or without a map; `unsupported` when no node had the RPC.
    pub(crate) fn end_refresh(&mut self, now: Instant, unsupported: bool) {
        self.refresh.in_flight = false;
        if unsupported {
            self.refresh.not_before = Some(now + MAP_UNSUPPORTED_RETRY);
        }
    }

    /// The change count now, for installing a map fetched from here on.
    pub(crate) fn changes(&self) -> u64 {
        self.refresh.changes
    }

    /// Installs a fetched map. Entries that calls changed since the fetch started (`since`) are
    /// kept; a shard the answer names no leader for keeps the one known; a leader that failed
    /// within [`SUSPECT_FOR`] is not believed. A map with no shards is ignored.
    pub(crate) fn install(&mut self, resp: &pb::ShardMapResponse, since: u64, now: Instant) {
        let shards = resp.shards as usize;
        if shards == 0 {
            return;
        }
        let old = self.map.take().filter(|m| m.leaders.len() == shards);
        let mut named = vec![None; shards];
        for l in &resp.leaders {
            let addr = crate::normalize(&l.leader_grpc_addr);
            if l.leader_id == 0 || addr.is_empty() || l.shard_id as usize >= shards {
                continue;
            }
            named[l.shard_id as usize] = self.index_of(&addr);
        }
        let leaders = (0..shards)
            .map(|s| {
                let old = old.as_ref().map(|m| m.leaders[s]).unwrap_or_default();
                if old.changed > since {
                    return old; // learned by a call while the fetch ran
                }
                let leader = named[s].or(old.leader).filter(|&i| !self.suspect(i, now));
                Entry { leader, changed: since }
            })
            .collect();
        self.map = Some(ShardMap { leaders });
    }

    fn suspect(&self, index: usize, now: Instant) -> bool {
        let window = if self.reached[index] { SUSPECT_FOR } else { SUSPECT_NEVER_REACHED_FOR };
        self.failed_at[index].is_some_and(|t| now.saturating_duration_since(t) < window)
    }

    /// The cached leader address of each shard, for tests and diagnostics.
    #[cfg(test)]
    pub(crate) fn leader_addrs(&self) -> Option<Vec<Option<&str>>> {
        let map = self.map.as_ref()?;
        Some(map.leaders.iter().map(|e| e.leader.map(|i| self.addrs[i].as_str())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(addrs: &[&str]) -> Endpoints {
        Endpoints::new(addrs.iter().map(|a| a.to_string()).collect(), Security::default()).expect("valid addresses")
    }

    fn map(shards: u32, leaders: &[(u32, &str)]) -> pb::ShardMapResponse {
        pb::ShardMapResponse {
            shards,
            leaders: leaders
                .iter()
                .map(|(s, a)| pb::ShardLeader {
                    shard_id: *s,
                    leader_id: if a.is_empty() { 0 } else { 1 + u64::from(*s) },
                    leader_grpc_addr: a.to_string(),
                })
                .collect(),
        }
    }

    /// An id placed on `shard` of `shards`, found by trying ids (the hash is vow-core's).
    fn id_on(shard: u32, shards: u32) -> String {
        (0..)
            .map(|n| format!("id-{n}"))
            .find(|id| ShardId::for_promise(&PromiseId::new_unchecked(id.as_str()), shards).0 == shard)
            .expect("some id lands on every shard")
    }

    const A: &str = "127.0.0.1:1";
    const B: &str = "127.0.0.1:2";
    const C: &str = "127.0.0.1:3";

    #[test]
    fn without_a_map_calls_go_round_the_endpoints_from_the_preferred_one() {
        let mut e = endpoints(&[A, B, C]);
        assert_eq!(e.shard_of("p"), None);
        assert!(e.map_looks_stale(None));
        e.preferred = 1;
        let order: Vec<usize> = (0..4).map(|r| e.choose(e.shard_of("p"), r).index).collect();
        assert_eq!(order, [1, 2, 0, 1]);
        assert!((0..4).all(|r| !e.choose(None, r).routed));
        // A hint without a map moves the rotation, as it always did.
        assert!(e.follow_hint(C, None, Instant::now()));
        assert_eq!(e.choose(e.shard_of("p"), 0), Choice { index: 2, routed: false });
    }

    #[test]
    fn the_map_sends_the_first_try_to_the_shards_leader_and_adds_unknown_addresses() {
        let mut e = endpoints(&[A]);
        e.install(&map(4, &[(0, A), (1, B), (2, "http://127.0.0.1:3/"), (3, "")]), 0, Instant::now());
        assert_eq!(e.leader_addrs(), Some(vec![Some(A), Some(B), Some(C), None]));
        assert_eq!(e.addrs, [A, B, C], "leaders the client did not know were added, normalised");
        for (shard, want) in [(0, Some(A)), (1, Some(B)), (2, Some(C)), (3, None)] {
            let id = id_on(shard, 4);
            let s = e.shard_of(&id);
            assert_eq!(s, Some(ShardId(shard)));
            let first = e.choose(s, 0);
            match want {
                Some(addr) => {
                    assert!(first.routed, "{id} on shard {shard}");
                    assert_eq!(e.addrs[first.index], addr, "{id} on shard {shard}");
                }
                // No leader known: the rotation decides, and the map is asked for again.
                None => {
                    assert_eq!(first, Choice { index: e.preferred, routed: false });
                    assert!(e.map_looks_stale(s));
                }
            }
            // Later tries of the same call go round the endpoints.
            assert!(!e.choose(s, 1).routed);
        }
    }

    #[test]
    fn hash_tags_place_ids_together() {
        let mut e = endpoints(&[A]);
        e.install(&map(8, &[]), 0, Instant::now());
        let s = e.shard_of("{user-42}");
        assert!(s.is_some());
        for id in ["order-1-{user-42}", "{user-42}:cart", "x{user-42}y{z}"] {
            assert_eq!(e.shard_of(id), s, "{id}");
        }
    }

    #[test]
    fn a_hint_updates_the_entry_of_the_calls_shard_only() {
        let mut e = endpoints(&[A, B, C]);
        e.install(&map(3, &[(0, A), (1, A), (2, A)]), 0, Instant::now());
        let id = id_on(1, 3);
        let shard = e.shard_of(&id);
        assert!(e.follow_hint(B, shard, Instant::now()));
        assert_eq!(e.leader_addrs(), Some(vec![Some(A), Some(B), Some(A)]));
        assert_eq!(e.addrs[e.choose(shard, 0).index], B);
        assert_eq!(e.addrs[e.preferred], B, "the hint also moves the rotation, as before");
        // A hint naming an address never seen before adds it.
        assert!(e.follow_hint("127.0.0.1:9", shard, Instant::now()));
        assert_eq!(e.leader_addrs(), Some(vec![Some(A), Some("127.0.0.1:9"), Some(A)]));
        assert!(!e.follow_hint("not an address", shard, Instant::now()));
    }

    #[test]
    fn a_failed_leader_is_dropped_and_a_fetched_map_does_not_bring_it_straight_back() {
        let t0 = Instant::now();
        let mut e = endpoints(&[A, B, C]);
        e.answered(1); // B has answered before: a failure makes it suspect only briefly
        e.install(&map(2, &[(0, B), (1, B)]), 0, t0);
        let s0 = e.shard_of(&id_on(0, 2));
        let first = e.choose(s0, 0);
        assert!(first.routed);
        e.failed(first.index, s0, t0);
        assert_eq!(e.leader_addrs(), Some(vec![None, Some(B)]), "only the failed call's shard is dropped");
        assert!(!e.choose(s0, 0).routed, "the shard's calls fall back to the rotation");
        assert!(e.map_looks_stale(s0));
        // A node whose view predates the failure still names B: not believed, for any shard,
        // for a while ...
        let since = e.changes();
        e.install(&map(2, &[(0, B), (1, C)]), since, t0 + Duration::from_millis(500));
        assert_eq!(e.leader_addrs(), Some(vec![None, Some(C)]));
        e.install(&map(2, &[(0, B), (1, B)]), since, t0 + Duration::from_millis(500));
        assert_eq!(e.leader_addrs(), Some(vec![None, None]));
        // ... then believed again.
        e.install(&map(2, &[(0, B), (1, B)]), e.changes(), t0 + SUSPECT_FOR);
        assert_eq!(e.leader_addrs(), Some(vec![Some(B), Some(B)]));
        // An answer from B clears the suspicion at once.
        e.failed(1, None, t0 + SUSPECT_FOR);
        e.answered(1);
        e.install(&map(2, &[(0, B), (1, B)]), e.changes(), t0 + SUSPECT_FOR);
        assert_eq!(e.leader_addrs(), Some(vec![Some(B), Some(B)]));
    }

    #[test]
    fn an_address_never_reached_is_not_followed_again_for_a_long_while() {
        // The map and the hints name a leader by a name only the cluster's own network resolves.
        const POD: &str = "vow-2.vow-peer.vow.svc.cluster.local:7001";
        let t0 = Instant::now();
        let mut e = endpoints(&[A, B]);
        e.install(&map(2, &[(0, POD), (1, POD)]), 0, t0);
        let s0 = e.shard_of(&id_on(0, 2));
        let first = e.choose(s0, 0);
        assert_eq!(e.addrs[first.index], POD);
        e.failed(first.index, s0, t0);
        // The node that forwarded the retry names it again: not followed, in maps or hints.
        assert!(!e.follow_hint(POD, s0, t0 + Duration::from_secs(1)));
        e.install(&map(2, &[(0, POD), (1, POD)]), e.changes(), t0 + SUSPECT_FOR + Duration::from_secs(1));
        assert_eq!(e.leader_addrs(), Some(vec![None, None]), "calls keep going through A and B");
        assert!(!e.follow_hint(POD, s0, t0 + SUSPECT_NEVER_REACHED_FOR - Duration::from_millis(1)));
        // Tried again after the longer while.
        assert!(e.follow_hint(POD, s0, t0 + SUSPECT_NEVER_REACHED_FOR));
    }

    #[test]
    fn a_fetch_does_not_overwrite_what_calls_learned_while_it_ran() {
        let now = Instant::now();
        let mut e = endpoints(&[A, B, C]);
        e.install(&map(2, &[(0, A), (1, A)]), 0, now);
        let fetch = e.start_refresh(now).expect("no fetch yet");
        let s1 = e.shard_of(&id_on(1, 2));
        assert!(e.follow_hint(C, s1, Instant::now())); // learned while the fetch runs
        e.install(&map(2, &[(0, B), (1, B)]), fetch.since, now); // the fetched view is older
        e.end_refresh(now, false);
        assert_eq!(e.leader_addrs(), Some(vec![Some(B), Some(C)]));
        // A later fetch replaces it; one that knows no leader keeps the known one.
        e.install(&map(2, &[(0, ""), (1, A)]), e.changes(), now);
        assert_eq!(e.leader_addrs(), Some(vec![Some(B), Some(A)]));
        // A different shard count replaces the map whole.
        e.install(&map(4, &[(3, C)]), e.changes(), now);
        assert_eq!(e.leader_addrs(), Some(vec![None, None, None, Some(C)]));
        // A map without shards is no map.
        e.install(&map(0, &[]), e.changes(), now);
        assert_eq!(e.leader_addrs().map(|l| l.len()), Some(4));
    }

    #[test]
    fn fetches_are_rate_limited_and_back_off_when_unsupported() {
        let t0 = Instant::now();
        let mut e = endpoints(&[A, B, C]);
        e.preferred = 2;
        let fetch = e.start_refresh(t0).expect("first fetch");
        assert_eq!(fetch.channels.len(), 3, "every endpoint may be asked");
        assert!(e.start_refresh(t0).is_none(), "one fetch at a time");
        e.end_refresh(t0, false);
        assert!(e.start_refresh(t0 + MAP_REFRESH_EVERY / 2).is_none(), "at most one per interval");
        assert!(e.start_refresh(t0 + MAP_REFRESH_EVERY).is_some());
        e.end_refresh(t0 + MAP_REFRESH_EVERY, true);
        assert!(e.start_refresh(t0 + MAP_REFRESH_EVERY * 5).is_none(), "an old server is not asked every second");
        assert!(e.start_refresh(t0 + MAP_REFRESH_EVERY + MAP_UNSUPPORTED_RETRY).is_some());
    }
}
