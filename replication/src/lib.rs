//! Sans-I/O replication core for Trireme volumes and its deterministic simulator.
//!
//! Two state machines, driven by events and an explicit `now` (milliseconds of the
//! caller's clock), that return actions and never touch sockets, clocks, disks, threads
//! or randomness:
//!
//! - [`Replica`]: the storage-node side of one volume copy (epoch fencing, newer-only
//!   application of block versions, flush, watermark, reads, resync scans);
//! - [`Writer`]: the exporting node's volume client (attach by epoch, sequence numbers,
//!   the acknowledgement rule, timeouts and out-of-sync marking, reads with fallback
//!   and read-repair, resync of returning copies, reconciliation at attach).
//!
//! [`msg`] holds the messages between them and [`codec`] their binary encoding. With the
//! `sim` feature, [`sim`] runs a writer and three replicas under seeded faults and
//! checks the durability contract (`design/DURABILITY.md`, scenario S1).

pub mod codec;
pub mod msg;
mod range_sync;
pub mod replica;
pub mod types;
pub mod writer;

#[cfg(feature = "sim")]
pub mod sim;

pub use replica::{Replica, ReplicaAction, ReplicaEvent, StoreOp};
pub use types::{BlockIndex, BlockVersion, Content, Epoch, Payload, ReplicaId, Seq, VolumeMeta};
pub use writer::{IoError, OpId, OpOutput, Seal, Writer, WriterAction, WriterConfig, WriterEvent};
