//! A Watch stream that survives the loss of the node serving it.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use tonic::Code;
use vow_api::v1 as pb;

use crate::{Client, Error, Result, promises};

/// How many recently delivered ids a watch remembers, to drop the repeats a resume may bring
/// (a resumed stream repeats at most the settlements of one log entry).
const REMEMBERED: usize = 4096;

/// Settlements as they happen (see `Client::watch`). `next` reconnects by itself — to another
/// node if need be — from the last resume token, and drops the settlements a resume repeats.
#[derive(Debug)]
pub struct Watch {
    client: Client,
    request: pb::WatchRequest,
    stream: Option<tonic::Streaming<pb::WatchEvent>>,
    rotate: u32,
    seen: HashSet<String>,
    order: VecDeque<String>,
}

impl Watch {
    pub(crate) fn new(client: Client, request: pb::WatchRequest) -> Watch {
        Watch { client, request, stream: None, rotate: 0, seen: HashSet::new(), order: VecDeque::new() }
    }

    /// The token to resume from after everything returned so far (empty before the first
    /// event).
    pub fn resume_token(&self) -> &str {
        &self.request.resume_token
    }

    /// The next event: a settlement, or a checkpoint (`promise` unset) that only moves the
    /// resume token. Fails only when no node could serve the watch for the client's call
    /// timeout, or when the cluster refuses it (a bad filter, a token too old).
    pub async fn next(&mut self) -> Result<pb::WatchEvent> {
        let mut broken_since: Option<Instant> = None;
        loop {
            let failure = match self.stream.as_mut() {
                None => match self.open().await {
                    Ok(stream) => {
                        self.stream = Some(stream);
                        continue;
                    }
                    Err(e) => e,
                },
                Some(stream) => match stream.message().await {
                    Ok(Some(event)) => {
                        broken_since = None;
                        self.request.resume_token.clone_from(&event.resume_token);
                        if let Some(p) = &event.promise
                            && !self.remember(&p.id)
                        {
                            continue;
                        }
                        return Ok(event);
                    }
                    Ok(None) => Error::Unavailable { message: "the watch stream ended".into(), outcome_unknown: false },
                    Err(s) => Error::from_status(&s, false),
                },
            };
            if !matches!(failure, Error::Unavailable { .. }) {
                return Err(failure);
            }
            self.stream = None;
            self.rotate += 1;
            let since = *broken_since.get_or_insert_with(Instant::now);
            if since.elapsed() > self.client.options.call_timeout {
                return Err(failure);
            }
            // A node just lost is not back at once: pause before trying the next endpoint.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn open(&self) -> Result<tonic::Streaming<pb::WatchEvent>> {
        let channel = {
            let e = self.client.lock();
            e.channel(e.choose(None, self.rotate).index)
        };
        let mut request = tonic::Request::new(self.request.clone());
        request.set_timeout(Duration::from_secs(365 * 24 * 3600));
        let mut stub = promises(channel);
        match tokio::time::timeout(self.client.options.attempt_timeout, stub.watch(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(s)) if s.code() == Code::Unknown => {
                Err(Error::Unavailable { message: s.to_string(), outcome_unknown: false })
            }
            Ok(Err(s)) => Err(Error::from_status(&s, false)),
            Err(_) => Err(Error::Unavailable { message: "opening the watch timed out".into(), outcome_unknown: false }),
        }
    }

    /// Records `id` as delivered; false if it was already.
    fn remember(&mut self, id: &str) -> bool {
        if !self.seen.insert(id.to_owned()) {
            return false;
        }
        self.order.push_back(id.to_owned());
        if self.order.len() > REMEMBERED
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }
}
