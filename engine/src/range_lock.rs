//! Exclusive locks on block ranges of one volume.
//!
//! Writes, trims and zeroing hold the blocks they touch for the whole read-modify-write,
//! so two overlapping unaligned writes cannot lose each other's bytes and a block is
//! never assembled from two writes. Reads take no lock: the store switches a block's
//! version atomically, so a read sees one whole version.

use std::ops::Range;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// A set of held block ranges.
#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Vec<Range<u64>>>,
    released: Notify,
}

/// Holds a range until dropped.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: Range<u64>,
}

impl RangeLock {
    /// Wait until no held range overlaps `range`, then hold it.
    pub async fn lock(&self, range: Range<u64>) -> RangeGuard<'_> {
        loop {
            // Register interest before checking, so a release between the check and
            // the await is not missed.
            let notified = self.released.notified();
            {
                let mut held = self.held.lock();
                if !held
                    .iter()
                    .any(|r| r.start < range.end && range.start < r.end)
                {
                    held.push(range.clone());
                    return RangeGuard { lock: self, range };
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock();
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlapping_ranges_exclude_each_other() {
        let lock = Arc::new(RangeLock::default());
        let inside = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for i in 0..16u64 {
            let (lock, inside) = (lock.clone(), inside.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let _g = lock.lock(i % 2..i % 2 + 2).await; // all contain block 1
                    assert_eq!(
                        inside.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two holders of block 1"
                    );
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test]
    async fn disjoint_ranges_do_not_wait() {
        let lock = RangeLock::default();
        let _a = lock.lock(0..4).await;
        let _b = lock.lock(4..8).await;
    }
}
