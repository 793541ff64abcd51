//! The sending side of the Raft transport: openraft's network traits over tonic.

use std::future::Future;
use std::io::Read;
use std::sync::Arc;

use openraft::alias::SnapshotOf;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use tonic::transport::Channel;
use vow_api::raft::raft_client::RaftClient;
use vow_api::raft::{RaftRequest, SnapshotChunk};
use vow_core::{NodeId, ShardId};

use super::{TypeConfig, Vote, VowNode, codec};
use crate::peers::Peers;
use crate::storage::snapshot::SnapshotFile;

/// Bytes of snapshot data per streamed chunk.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Creates a shard's clients to its peers.
#[derive(Clone, Debug)]
pub struct NetworkFactory {
    pub peers: Peers,
    pub shard: ShardId,
    pub cluster_name: Arc<str>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &VowNode) -> PeerClient {
        PeerClient {
            channel: self.peers.channel(&node.grpc_addr).map_err(|e| e.to_string()),
            target,
            shard: self.shard,
            cluster_name: self.cluster_name.clone(),
        }
    }
}

/// One shard's client to one peer.
#[derive(Debug)]
pub struct PeerClient {
    channel: Result<Channel, String>,
    target: NodeId,
    shard: ShardId,
    cluster_name: Arc<str>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

fn unreachable(msg: impl Into<String>) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&TransportError(msg.into())))
}

fn status_error(s: tonic::Status) -> RPCError<TypeConfig> {
    match s.code() {
        // Not connected, refused, or the peer is another node / another cluster: back off.
        tonic::Code::Unavailable | tonic::Code::FailedPrecondition | tonic::Code::Unknown => {
            unreachable(format!("{}: {}", s.code(), s.message()))
        }
        _ => RPCError::Network(NetworkError::new(&TransportError(format!("{}: {}", s.code(), s.message())))),
    }
}

fn decode_error(e: vow_core::DecodeError) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&TransportError(format!("malformed reply: {e}"))))
}

impl PeerClient {
    fn client(&self) -> Result<RaftClient<Channel>, RPCError<TypeConfig>> {
        match &self.channel {
            Ok(c) => Ok(RaftClient::new(c.clone()).max_decoding_message_size(usize::MAX)),
            Err(e) => Err(unreachable(e.clone())),
        }
    }

    fn request(&self, payload: Vec<u8>, option: &RPCOption) -> tonic::Request<RaftRequest> {
        let mut req = tonic::Request::new(RaftRequest {
            shard_id: self.shard.0,
            target_node_id: self.target.0,
            cluster_name: self.cluster_name.to_string(),
            payload: payload.into(),
        });
        req.set_timeout(option.hard_ttl());
        req
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.request(codec::encode_append_request(&rpc), &option);
        let reply = self.client()?.append_entries(req).await.map_err(status_error)?;
        codec::decode_append_response(&reply.into_inner().payload).map_err(decode_error)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.request(codec::encode_vote_request(&rpc), &option);
        let reply = self.client()?.vote(req).await.map_err(status_error)?;
        codec::decode_vote_response(&reply.into_inner().payload).map_err(decode_error)
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.request(codec::encode_transfer_request(&rpc), &option);
        let reply = self.client()?.transfer_leader(req).await.map_err(status_error)?;
        codec::decode_transfer_response(&reply.into_inner().payload).map_err(decode_error)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client()?;
        let header = self.request(codec::encode_snapshot_header(&vote, &snapshot.meta), &option).into_inner();
        // Read the file on a blocking thread, one chunk at a time, with a small buffer between
        // the reader and the stream: memory stays at a few chunks whatever the snapshot size.
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(2);
        let mut file = snapshot.snapshot.file;
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut header = Some(header);
            loop {
                let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
                let n = file.read(&mut buf)?;
                buf.truncate(n);
                let chunk = SnapshotChunk { header: header.take(), data: buf.into() };
                if tx.blocking_send(chunk).is_err() || n == 0 {
                    return Ok(());
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let call = client.install_snapshot(stream);
        let reply = tokio::select! {
            r = call => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(unreachable(format!("reading snapshot file: {e}")).into()),
            Err(e) => return Err(unreachable(format!("snapshot reader failed: {e}")).into()),
        }
        let reply = reply.map_err(status_error)?;
        codec::decode_snapshot_response(&reply.into_inner().payload).map_err(|e| decode_error(e).into())
    }
}
