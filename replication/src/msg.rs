//! Messages between a writer and the replicas of a volume. Every request carries the
//! writer's epoch (fencing) and the replica incarnation it expects (a replica that
//! restarted lost its unsynced writes and must not answer as if it had them); every
//! reply carries the request's id and the replica's incarnation.

use crate::types::{BlockIndex, BlockVersion, Epoch, Seq};

/// Most entries in one scan reply: a limit on every message.
pub const MAX_SCAN_ENTRIES: u32 = 256;

/// Largest block payload a message may carry (a 4 KiB block plus room for a tag).
pub const MAX_PAYLOAD: usize = 4096 + 64;

/// Incarnation meaning "whichever": used by status probes, which learn it.
pub const ANY_INCARNATION: u64 = 0;

/// A writer-to-replica message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub epoch: Epoch,
    /// The replica incarnation the writer expects, or [`ANY_INCARNATION`].
    pub incarnation: u64,
    /// Request id, echoed in the reply; retransmissions reuse it.
    pub op: u64,
    pub body: RequestBody,
}

/// What a writer asks of a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestBody {
    /// Report epoch, incarnation and watermark (also fences older writers).
    Status,
    /// Store `version` of `block` if newer. `prev` is the seq the writer issued just
    /// before this one: the chain from which a replica proves its watermark.
    Write {
        block: BlockIndex,
        version: BlockVersion,
        prev: Seq,
        fua: bool,
    },
    /// Make every applied write durable.
    Flush,
    /// Read the stored version of a block.
    Read { block: BlockIndex },
    /// Blocks in `[start, end)` whose stored seq is above `since` (sparse, resumable).
    Scan {
        since: Seq,
        start: BlockIndex,
        end: BlockIndex,
        limit: u32,
    },
    /// Set a block to a chosen version (`None`: remove) under [`crate::types::ApplyRule::Install`].
    Install {
        block: BlockIndex,
        version: Option<BlockVersion>,
        keep_from: Seq,
    },
    /// Rewrite a block whose copy failed verification with a verified version.
    Repair {
        block: BlockIndex,
        version: BlockVersion,
    },
    /// The writer vouches that this copy agrees with the volume's history up to `seq`
    /// (after a resync or a reconciliation); the watermark chain continues from there.
    /// The replica syncs before answering.
    SetWatermark { seq: Seq },
}

/// A replica-to-writer message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub op: u64,
    pub incarnation: u64,
    pub body: ReplyBody,
}

/// A replica's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    /// The request's epoch is older than the replica's: the writer is fenced.
    Fenced {
        epoch: Epoch,
    },
    /// The replica restarted since the writer last knew it.
    Restarted,
    Status {
        epoch: Epoch,
        watermark: Seq,
    },
    /// A Write, Install or Repair is applied (or superseded by a newer version).
    Applied,
    Flushed,
    Read {
        version: Option<BlockVersion>,
    },
    Scanned {
        entries: Vec<(BlockIndex, BlockVersion)>,
        next: Option<BlockIndex>,
    },
    WatermarkSet {
        watermark: Seq,
    },
}

/// Anything on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Request(Request),
    Reply(Reply),
}
