//! Deterministic simulation of a writer and three replicas (design/DURABILITY.md, S1),
//! after TigerBeetle's VOPR: one seed drives the network (loss, duplication,
//! reordering, delay, partitions both ways and one way), the disks (crashes that keep or
//! drop each unsynced write, bit flips on at most one copy of a block), the processes
//! (replica crash/restart, writer crash and re-attach, a fenced writer that keeps
//! sending) and the workload, all in virtual time. [`checker`] watches the whole cluster;
//! a failing seed replays exactly with [`run`] and `trace = true`.

pub mod checker;
pub mod rng;
pub mod store;
mod world;

pub use world::{Outcome, run};
