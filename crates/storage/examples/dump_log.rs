//! Debugging aid: prints the entries of one shard's Raft log that concern a promise id, from a
//! stopped node's database, with their log ids, and any gap in the log. Comparing its output on
//! every node shows whether replicas hold different entries at one log id (how the leader
//! restore divergence of issue #14 was found).
//!
//! `cargo build --workspace --examples`, then
//! `$CARGO_TARGET_DIR/debug/examples/dump_log DATA_DIR/db SHARD ID`.
use openraft::EntryPayload;
use rocksdb::{Direction, IteratorMode};
use vow_core::ShardId;
use vow_storage::{CF_LOG, codec, keys};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, shard, id] = &args[..] else {
        return Err("usage: dump_log DB_DIR SHARD ID".into());
    };
    let shard = ShardId(shard.parse()?);
    let db = vow_storage::open(std::path::Path::new(dir))?;
    let log = db.cf_handle(CF_LOG).ok_or("no log column family")?;
    let prefix = keys::shard_prefix(shard);
    let mut previous: Option<u64> = None;
    for item in db.iterator_cf(log, IteratorMode::From(&keys::log(shard, 0), Direction::Forward)) {
        let (key, value) = item?;
        if !key.starts_with(&prefix) {
            break;
        }
        let entry = codec::decode_entry(&value)?;
        let index = entry.log_id.index;
        if previous.is_some_and(|p| index != p + 1) {
            println!("gap: {} follows {}", index, previous.unwrap_or_default());
        }
        previous = Some(index);
        if let EntryPayload::Normal(proposal) = &entry.payload
            && proposal.command.promise_id().is_some_and(|pid| pid.as_str() == id.as_str())
        {
            println!("{index} {:?} stamp={} {:?}", entry.log_id.leader_id, proposal.stamp_ms, proposal.command);
        }
    }
    println!("last index {previous:?}");
    Ok(())
}
