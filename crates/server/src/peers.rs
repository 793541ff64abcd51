//! One HTTP/2 connection per peer address, shared by every shard's Raft traffic and by request
//! forwarding.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// A cache of lazily connected channels. Cloning shares the cache.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Peers {
    /// The channel to `addr` (`host:port`), created on first use. Connection failures surface
    /// on the calls, which is where the callers handle them.
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        // The lock only guards the map lookup; it is never held across an await.
        let mut channels = self.channels.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy();
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }
}
