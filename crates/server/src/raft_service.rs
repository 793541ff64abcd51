//! The receiving side of the Raft transport (the sending side is `raft/network.rs`): decodes a
//! message, hands it to the addressed shard's Raft instance, encodes the reply.

use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt, stream};
use openraft::alias::SnapshotOf;
use tonic::{Request, Response, Status, Streaming};
use vow_api::raft::raft_server::Raft as RaftRpc;
use vow_api::raft::{RaftReply, RaftRequest, SnapshotChunk};
use vow_core::NodeId;

use crate::clock::WallClock;
use crate::shard::Shard;
use vow_storage::codec;
use vow_storage::snapshot::{self, SnapshotFile};

#[derive(Clone, Debug)]
pub struct RaftService {
    pub node_id: NodeId,
    pub cluster_name: Arc<str>,
    pub shards: Arc<[Shard]>,
    pub data_dir: std::path::PathBuf,
    /// Every reply carries this node's clock reading (see [`crate::clock`]).
    pub clock: WallClock,
    /// Every request is checked against, and every reply carries, incarnations.
    pub incarnations: crate::incarnation::Incarnations,
}

fn malformed(e: vow_core::DecodeError) -> Status {
    Status::invalid_argument(format!("malformed raft message: {e}"))
}

fn stopped(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("raft stopped: {e}"))
}

impl RaftService {
    fn reply(&self, payload: Vec<u8>) -> Result<Response<RaftReply>, Status> {
        Ok(Response::new(RaftReply {
            payload: payload.into(),
            sender_time_ms: self.clock.now_ms(),
            sender_incarnation: self.incarnations.mine(),
        }))
    }

    /// The shard a message is for, after checking it was meant for this node and cluster.
    fn shard(&self, req: &RaftRequest) -> Result<&Shard, Status> {
        if req.target_node_id != self.node_id.0 {
            return Err(Status::failed_precondition(format!(
                "message for node {} reached node {}",
                req.target_node_id, self.node_id
            )));
        }
        if *req.cluster_name != *self.cluster_name {
            return Err(Status::failed_precondition(format!(
                "message from cluster {:?} reached cluster {:?}",
                req.cluster_name, self.cluster_name
            )));
        }
        self.incarnations.check_request(
            req.sender_node_id,
            req.sender_incarnation,
            req.target_incarnation,
            &req.known_incarnations,
        )?;
        self.shards.get(req.shard_id as usize).ok_or_else(|| Status::not_found(format!("no shard {}", req.shard_id)))
    }
}

/// Replies on the streamed AppendEntries RPC.
pub type ReplyStream = Pin<Box<dyn Stream<Item = Result<RaftReply, Status>> + Send + 'static>>;

impl RaftService {
    /// Feeds one leader's stream of AppendEntries requests to the addressed shard, replying to
    /// each in order. The first request names the shard; a malformed request ends the stream
    /// after the replies to the requests before it, with INVALID_ARGUMENT.
    fn append_stream(&self, mut input: Streaming<RaftRequest>) -> ReplyStream {
        let service = self.clone();
        let replies = async move {
            let first = match input.next().await {
                Some(Ok(first)) => first,
                Some(Err(status)) => return stream::iter([Err(status)]).boxed(),
                None => return stream::empty().boxed(),
            };
            let shard = match service.shard(&first) {
                Ok(shard) => shard.clone(),
                Err(status) => return stream::iter([Err(status)]).boxed(),
            };
            let invalid: Arc<Mutex<Option<Status>>> = Arc::default();
            let invalid_in = invalid.clone();
            // A transport error ends the input quietly: the connection is gone, nobody to tell.
            let heard = shard.clone();
            let requests = stream::iter([Ok(first)]).chain(input).scan((), move |_, msg| {
                heard.leader_heard();
                let rpc = match msg.map(|m| codec::decode_append_request(&m.payload)) {
                    Ok(Ok(rpc)) => Some(rpc),
                    Ok(Err(e)) => {
                        *invalid_in.lock().unwrap_or_else(|p| p.into_inner()) = Some(malformed(e));
                        None
                    }
                    Err(_) => None,
                };
                std::future::ready(rpc)
            });
            let (clock, incarnations) = (service.clock, service.incarnations.clone());
            let results = shard.raft.stream_append(requests).map(move |r| match r {
                Ok(result) => Ok(RaftReply {
                    payload: codec::encode_stream_append_result(&result).into(),
                    sender_time_ms: clock.now_ms(),
                    sender_incarnation: incarnations.mine(),
                }),
                Err(fatal) => Err(stopped(fatal)),
            });
            let trailer = stream::once(async move { invalid.lock().unwrap_or_else(|p| p.into_inner()).take() })
                .filter_map(|status| std::future::ready(status.map(Err)));
            results.chain(trailer).boxed()
        };
        stream::once(replies).flatten().boxed()
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    type StreamAppendStream = ReplyStream;

    async fn stream_append(
        &self,
        request: Request<Streaming<RaftRequest>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        // Answer with headers at once; the first request (which names the shard) may come
        // much later, when the leader has something to send.
        Ok(Response::new(self.append_stream(request.into_inner())))
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let shard = self.shard(&req)?;
        let rpc = codec::decode_vote_request(&req.payload).map_err(malformed)?;
        let resp = shard.raft.vote(rpc).await.map_err(stopped)?;
        self.reply(codec::encode_vote_response(&resp))
    }

    async fn pre_vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let shard = self.shard(&req)?;
        let rpc = codec::decode_vote_request(&req.payload).map_err(malformed)?;
        let resp = shard.raft.pre_vote(rpc).await.map_err(stopped)?;
        self.reply(codec::encode_vote_response(&resp))
    }

    async fn append_entries(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let shard = self.shard(&req)?;
        shard.leader_heard();
        let rpc = codec::decode_append_request(&req.payload).map_err(malformed)?;
        let resp = shard.raft.append_entries(rpc).await.map_err(stopped)?;
        self.reply(codec::encode_append_response(&resp))
    }

    async fn transfer_leader(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let shard = self.shard(&req)?;
        let rpc = codec::decode_transfer_request(&req.payload).map_err(malformed)?;
        let resp = shard.raft.handle_transfer_leader(rpc).await.map_err(stopped)?;
        self.reply(codec::encode_transfer_response(&resp))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftReply>, Status> {
        let mut stream = request.into_inner();
        let first = stream.next().await.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let header = first.header.ok_or_else(|| Status::invalid_argument("first snapshot chunk has no header"))?;
        let shard = self.shard(&header)?.clone();
        shard.leader_heard();
        let (vote, meta) = codec::decode_snapshot_header(&header.payload).map_err(malformed)?;

        // Spool to a temporary file beside the shard's snapshots; the state machine renames it
        // into place when it installs it.
        let dir = self.data_dir.join("snapshots").join(format!("shard-{}", shard.id.0));
        std::fs::create_dir_all(&dir).map_err(|e| Status::internal(e.to_string()))?;
        let path = dir.join(format!("recv-{:016x}.tmp", rand::random::<u64>()));
        let result = async {
            let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
            file.write_all(&first.data)?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(std::io::Error::other)?;
                file.write_all(&chunk.data)?;
            }
            let file = file.into_inner().map_err(|e| e.into_error())?;
            // The fsync of a whole state blocks: not on a runtime thread.
            tokio::task::spawn_blocking(move || file.sync_all()).await.map_err(std::io::Error::other)??;
            Ok::<_, std::io::Error>(())
        }
        .await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&path);
            return Err(Status::aborted(format!("snapshot transfer failed: {e}")));
        }
        // Read it through once: a torn or corrupt transfer is refused here, before the state
        // machine starts replacing its state with it.
        let check_path = path.clone();
        let expected = meta.clone();
        let verified = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let (found, mut reader) = snapshot::Reader::open(std::fs::File::open(&check_path)?)?;
            while reader.next_record()?.is_some() {}
            if found != expected {
                return Err(std::io::Error::other("snapshot header and file meta differ"));
            }
            Ok(())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        if let Err(e) = verified {
            let _ = std::fs::remove_file(&path);
            return Err(Status::data_loss(format!("received snapshot is invalid: {e}")));
        }
        let data = SnapshotFile::open(path.clone()).map_err(|e| Status::internal(e.to_string()))?;
        let snapshot: SnapshotOf<vow_storage::types::TypeConfig, SnapshotFile> =
            openraft::Snapshot { meta, snapshot: data };
        let installed = shard.raft.install_full_snapshot(vote, snapshot).await;
        // openraft may decline the snapshot (a stale vote, nothing newer than what is committed)
        // without handing the file to the state machine, which would have moved it: remove it.
        if path.exists() {
            let _ = std::fs::remove_file(&path);
        }
        let resp = installed.map_err(stopped)?;
        self.reply(codec::encode_snapshot_response(&resp))
    }
}
