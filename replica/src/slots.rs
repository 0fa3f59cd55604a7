//! Slot bookkeeping of one volume's data file: which 4 KiB slots are free, which were
//! freed but may not be reused yet, and which readers may still be looking at them.
//!
//! A slot goes through these states:
//!
//! ```text
//!  free ──allocate──▶ reserved ──index commit──▶ live ──overwrite/discard──▶ freed
//!    ▲                   │ (write failed,                                      │
//!    │                   │  version stale)                        sync: index durable
//!    └───────────────────┘                                                      ▼
//!    └──── (punched or truncated) ◀── reclaimable ◀── no older reader ◀── retired
//! ```
//!
//! Two rules keep data safe. A freed slot is reused only after a sync has made the
//! index change that freed it durable, so after a crash no durable index entry points
//! at a slot that was overwritten. And a retired slot waits until every read that began
//! before it was retired has finished, because such a read may have looked the slot up
//! in the index just before the overwrite and still be reading it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Highest slot count a data file may have: the byte offset of every slot must fit in
/// an `off_t`.
pub(crate) const MAX_SLOTS: u64 = (i64::MAX as u64) / crate::block::BLOCK_BYTES;

/// Freed runs at least this long (256 KiB) have their space given back to the
/// filesystem with a hole punch before reuse. Shorter runs — what random overwrites
/// leave — are reused by the next writes anyway, and punching each of them would cost a
/// filesystem transaction per slot in every sync and make the write that reuses the slot
/// allocate it again.
pub(crate) const PUNCH_MIN_SLOTS: u64 = 64;

/// A run of consecutive slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotRun {
    pub start: u64,
    pub len: u64,
}

impl SlotRun {
    pub(crate) fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Free slots kept as runs, indexed by start (lowest-first reuse) and by length (a
/// batch goes into one contiguous run when one is big enough). Memory is O(runs).
#[derive(Debug, Default)]
pub(crate) struct FreeRuns {
    by_start: BTreeMap<u64, u64>,
    by_len: BTreeSet<(u64, u64)>,
    count: u64,
}

impl FreeRuns {
    /// Number of free slots.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Number of runs.
    #[cfg(test)]
    pub(crate) fn runs(&self) -> usize {
        self.by_start.len()
    }

    fn add_raw(&mut self, start: u64, len: u64) {
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
        self.count += len;
    }

    fn remove_raw(&mut self, start: u64, len: u64) {
        self.by_start.remove(&start);
        self.by_len.remove(&(len, start));
        self.count -= len;
    }

    /// Marks a run free, merging it with its neighbours. Returns false (and changes
    /// nothing) if any slot of it is already free: a double free would hand one slot
    /// to two blocks.
    #[must_use]
    pub(crate) fn insert(&mut self, run: SlotRun) -> bool {
        if run.len == 0 {
            return true;
        }
        let mut start = run.start;
        let mut end = run.end();
        if let Some((&prev_start, &prev_len)) = self.by_start.range(..=run.start).next_back() {
            let prev_end = prev_start + prev_len;
            if prev_end > run.start {
                return false;
            }
            if prev_end == run.start {
                self.remove_raw(prev_start, prev_len);
                start = prev_start;
            }
        }
        if let Some((&next_start, &next_len)) = self.by_start.range(run.start..).next() {
            if next_start < run.end() {
                // Undo the merge with the previous run before refusing.
                if start != run.start {
                    self.add_raw(start, run.start - start);
                }
                return false;
            }
            if next_start == run.end() {
                self.remove_raw(next_start, next_len);
                end = next_start + next_len;
            }
        }
        self.add_raw(start, end - start);
        true
    }

    /// Takes the lowest free slot.
    pub(crate) fn take_lowest(&mut self) -> Option<u64> {
        let (&start, &len) = self.by_start.iter().next()?;
        self.remove_raw(start, len);
        if len > 1 {
            self.add_raw(start + 1, len - 1);
        }
        Some(start)
    }

    /// Takes `n` consecutive free slots from the smallest run that holds them (lowest
    /// start among equals).
    pub(crate) fn take_contiguous(&mut self, n: u64) -> Option<SlotRun> {
        if n == 0 {
            return None;
        }
        let &(len, start) = self.by_len.range((n, 0)..).next()?;
        self.remove_raw(start, len);
        if len > n {
            self.add_raw(start + n, len - n);
        }
        Some(SlotRun { start, len: n })
    }

    /// Takes up to `n` slots from the largest run (fewest pieces for a batch that fits
    /// in no single run).
    pub(crate) fn take_from_largest(&mut self, n: u64) -> Option<SlotRun> {
        let &(len, start) = self.by_len.iter().next_back()?;
        let take = len.min(n);
        self.remove_raw(start, len);
        if len > take {
            self.add_raw(start + take, len - take);
        }
        Some(SlotRun { start, len: take })
    }

    /// Removes and returns the run that ends exactly at `end`, if there is one.
    pub(crate) fn take_ending_at(&mut self, end: u64) -> Option<SlotRun> {
        let (&start, &len) = self.by_start.iter().next_back()?;
        if start + len != end {
            return None;
        }
        self.remove_raw(start, len);
        Some(SlotRun { start, len })
    }

    /// Whether `slot` is free.
    #[cfg(test)]
    pub(crate) fn contains(&self, slot: u64) -> bool {
        self.by_start
            .range(..=slot)
            .next_back()
            .is_some_and(|(&start, &len)| slot < start + len)
    }
}

/// Sorts slots and merges them into runs.
pub(crate) fn into_runs(mut slots: Vec<u64>) -> Vec<SlotRun> {
    slots.sort_unstable();
    slots.dedup();
    let mut runs: Vec<SlotRun> = Vec::new();
    for slot in slots {
        match runs.last_mut() {
            Some(run) if run.end() == slot => run.len += 1,
            _ => runs.push(SlotRun {
                start: slot,
                len: 1,
            }),
        }
    }
    runs
}

/// What a sync should do with the slots that became reclaimable.
#[derive(Debug, Default)]
pub(crate) struct ReclaimPlan {
    /// When set, the file can shrink to this many slots: every slot from here to the
    /// end is free or reclaimable, and these runs were taken out of the free set.
    pub truncate_to: Option<u64>,
    /// Runs at the tail removed for truncation (given back if truncation fails).
    pub tail: Vec<SlotRun>,
    /// Runs whose space should be given back with a hole punch, then freed.
    pub punch: Vec<SlotRun>,
    /// Runs too short to be worth a punch, already freed.
    pub freed: u64,
}

/// Slot state of one volume. Lives behind the volume's mutex; every method is O(log n)
/// or O(slots handled).
#[derive(Debug, Default)]
pub(crate) struct SlotMap {
    /// Slots in the file's address space: every slot at or above is unused.
    len: u64,
    free: FreeRuns,
    /// No longer referenced by the index; the change is not known to be durable.
    freed: Vec<u64>,
    /// Durable-freed, waiting for reads that began before their epoch.
    retired: VecDeque<(u64, Vec<u64>)>,
    /// Safe to reuse once their space has been reclaimed.
    reclaimable: Vec<u64>,
    /// Incremented each time slots are retired.
    epoch: u64,
    /// Reads in progress, by the epoch they began in.
    readers: BTreeMap<u64, usize>,
}

impl SlotMap {
    /// Rebuilds the map of a data file from the slots its index references (sorted,
    /// distinct). Every other slot below the last referenced one is free; the file is
    /// meant to be cut back to [`SlotMap::len`] slots.
    pub(crate) fn rebuild(referenced: impl IntoIterator<Item = u64>) -> SlotMap {
        let mut map = SlotMap::default();
        let mut next = 0u64;
        for slot in referenced {
            if slot > next {
                let inserted = map.free.insert(SlotRun {
                    start: next,
                    len: slot - next,
                });
                debug_assert!(inserted, "rebuild inserts disjoint runs");
            }
            next = slot + 1;
        }
        map.len = next;
        map
    }

    /// Slots in the file's address space.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Free slots (reusable now).
    pub(crate) fn free_count(&self) -> u64 {
        self.free.count()
    }

    /// Whether `slot` is free.
    #[cfg(test)]
    pub(crate) fn is_free(&self, slot: u64) -> bool {
        self.free.contains(slot)
    }

    /// Allocates `n` slots. A single slot is the lowest free one (the file stays
    /// compact at its start and can shrink at its end); a batch gets as few runs as
    /// possible: one free run that fits, else pieces of the largest free runs, else new
    /// slots at the end of the file.
    pub(crate) fn allocate(&mut self, n: u64) -> Option<Vec<SlotRun>> {
        if n == 0 {
            return Some(Vec::new());
        }
        if n == 1
            && let Some(start) = self.free.take_lowest()
        {
            return Some(vec![SlotRun { start, len: 1 }]);
        }
        if let Some(run) = self.free.take_contiguous(n) {
            return Some(vec![run]);
        }
        let from_free = n.min(self.free.count());
        let to_extend = n - from_free;
        let new_len = self.len.checked_add(to_extend)?;
        if new_len > MAX_SLOTS {
            return None;
        }
        let mut runs = Vec::new();
        let mut left = from_free;
        while left > 0 {
            let Some(run) = self.free.take_from_largest(left) else {
                break;
            };
            left -= run.len;
            runs.push(run);
        }
        debug_assert_eq!(left, 0, "free count covers the pieces taken");
        if to_extend > 0 {
            runs.push(SlotRun {
                start: self.len,
                len: to_extend,
            });
            self.len = new_len;
        }
        Some(runs)
    }

    /// Gives back slots that were allocated but never referenced by a durable index
    /// entry (failed or stale writes): free again at once.
    pub(crate) fn release_unused(&mut self, runs: &[SlotRun]) {
        for run in runs {
            if !self.free.insert(*run) {
                tracing::error!(?run, "slot run released twice; keeping it out of use");
            }
        }
    }

    /// Records slots the index stopped referencing (overwrite, discard).
    pub(crate) fn free_after_sync(&mut self, slots: impl IntoIterator<Item = u64>) {
        self.freed.extend(slots);
    }

    /// Takes the slots freed so far, at the start of a sync.
    pub(crate) fn take_freed(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.freed)
    }

    /// Puts back slots taken by [`SlotMap::take_freed`] when the sync failed.
    pub(crate) fn untake_freed(&mut self, slots: Vec<u64>) {
        self.freed.extend(slots);
    }

    /// The sync that took `slots` made their index changes durable: they become
    /// reclaimable once no read that began before now is still running.
    pub(crate) fn retire(&mut self, slots: Vec<u64>) {
        if slots.is_empty() {
            return;
        }
        self.epoch += 1;
        self.retired.push_back((self.epoch, slots));
        self.release_retired();
    }

    fn release_retired(&mut self) {
        let oldest_reader = self.readers.keys().next().copied();
        while let Some((epoch, _)) = self.retired.front() {
            if oldest_reader.is_some_and(|reader| reader < *epoch) {
                break;
            }
            if let Some((_, slots)) = self.retired.pop_front() {
                self.reclaimable.extend(slots);
            }
        }
    }

    /// Registers a read about to look up slots in the index; returns its epoch for
    /// [`SlotMap::end_read`].
    pub(crate) fn begin_read(&mut self) -> u64 {
        *self.readers.entry(self.epoch).or_insert(0) += 1;
        self.epoch
    }

    /// A read registered with `epoch` no longer looks at its slots.
    pub(crate) fn end_read(&mut self, epoch: u64) {
        if let Some(count) = self.readers.get_mut(&epoch) {
            *count -= 1;
            if *count == 0 {
                self.readers.remove(&epoch);
                self.release_retired();
            }
        }
    }

    /// Takes the reclaimable slots and decides what to do with them: the run at the end
    /// of the file (with any free run it touches) is cut off by truncation; runs of at
    /// least [`PUNCH_MIN_SLOTS`] are to be punched and then freed with
    /// [`SlotMap::release_unused`]; shorter runs are freed now.
    pub(crate) fn plan_reclaim(&mut self) -> ReclaimPlan {
        let mut runs = into_runs(std::mem::take(&mut self.reclaimable));
        let mut plan = ReclaimPlan::default();
        let mut end = self.len;
        loop {
            if let Some(last) = runs.last().copied()
                && last.end() == end
            {
                runs.pop();
                plan.tail.push(last);
                end = last.start;
            } else if let Some(run) = self.free.take_ending_at(end) {
                plan.tail.push(run);
                end = run.start;
            } else {
                break;
            }
        }
        if end < self.len {
            plan.truncate_to = Some(end);
        }
        for run in runs {
            if run.len >= PUNCH_MIN_SLOTS {
                plan.punch.push(run);
            } else {
                plan.freed += run.len;
                self.release_unused(&[run]);
            }
        }
        plan
    }

    /// The file was truncated to `slots` slots as planned.
    pub(crate) fn truncated(&mut self, slots: u64) {
        debug_assert!(slots <= self.len);
        self.len = slots;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: u64, len: u64) -> SlotRun {
        SlotRun { start, len }
    }

    #[test]
    fn free_runs_merge_and_refuse_double_free() {
        let mut free = FreeRuns::default();
        assert!(free.insert(run(10, 2)));
        assert!(free.insert(run(14, 2)));
        assert!(free.insert(run(12, 2)));
        assert_eq!(free.runs(), 1);
        assert_eq!(free.count(), 6);
        assert!(!free.insert(run(15, 1)));
        assert!(!free.insert(run(8, 3)));
        assert!(!free.insert(run(9, 10)));
        assert_eq!(free.count(), 6);
        assert_eq!(free.runs(), 1);
        assert!(free.contains(10) && free.contains(15) && !free.contains(16) && !free.contains(9));
        // A refused insert right after a mergeable neighbour leaves the set unchanged.
        assert!(free.insert(run(20, 1)));
        assert!(!free.insert(run(16, 5)));
        assert_eq!(free.count(), 7);
        assert_eq!(free.runs(), 2);
    }

    #[test]
    fn allocation_prefers_fitting_run_then_pieces_then_extension() {
        let mut map = SlotMap::rebuild([0, 1, 5, 6, 7, 9, 10, 19]);
        // Free: 2..5 (3), 8 (1), 11..19 (8); len 20.
        assert_eq!(map.len(), 20);
        assert_eq!(map.free_count(), 12);
        assert_eq!(map.allocate(3), Some(vec![run(2, 3)]));
        assert_eq!(map.allocate(2), Some(vec![run(11, 2)]));
        map.release_unused(&[run(11, 2)]);
        assert_eq!(map.allocate(1), Some(vec![run(8, 1)]));
        assert_eq!(map.allocate(10), Some(vec![run(11, 8), run(20, 2)]));
        assert_eq!(map.len(), 22);
        assert_eq!(map.free_count(), 0);
        map.release_unused(&[run(11, 8)]);
        assert_eq!(map.allocate(1), Some(vec![run(11, 1)]));
    }

    #[test]
    fn freed_slots_wait_for_sync_and_older_readers() {
        let mut map = SlotMap::rebuild([]);
        let runs = map.allocate(4).unwrap_or_default();
        assert_eq!(runs, vec![run(0, 4)]);
        let reader = map.begin_read();
        map.free_after_sync([1, 2]);
        assert_eq!(map.allocate(1), Some(vec![run(4, 1)]));
        let taken = map.take_freed();
        map.retire(taken);
        // The reader began before the retirement: nothing is reclaimable yet.
        assert_eq!(map.plan_reclaim().freed, 0);
        assert!(!map.is_free(1));
        let later_reader = map.begin_read();
        map.end_read(reader);
        let plan = map.plan_reclaim();
        assert_eq!(plan.freed, 2);
        assert!(plan.punch.is_empty());
        assert_eq!(plan.truncate_to, None);
        assert_eq!(map.allocate(2), Some(vec![run(1, 2)]));
        map.end_read(later_reader);
    }

    #[test]
    fn reclaim_truncates_the_tail_and_punches_long_runs() {
        let mut map = SlotMap::rebuild([]);
        let _ = map.allocate(1000);
        map.release_unused(&[run(998, 1)]);
        let long: Vec<u64> = (100..100 + PUNCH_MIN_SLOTS).collect();
        map.free_after_sync(long.iter().copied().chain([3, 997, 999]));
        let taken = map.take_freed();
        map.retire(taken);
        let plan = map.plan_reclaim();
        assert_eq!(plan.truncate_to, Some(997));
        assert_eq!(plan.tail.len(), 3);
        assert_eq!(plan.punch, vec![run(100, PUNCH_MIN_SLOTS)]);
        assert_eq!(plan.freed, 1);
        map.truncated(997);
        assert_eq!(map.len(), 997);
        assert!(!map.is_free(998));
        assert!(map.is_free(3));
        assert!(!map.is_free(100));
        map.release_unused(&plan.punch);
        assert_eq!(map.free_count(), 1 + PUNCH_MIN_SLOTS);
    }

    #[test]
    fn rebuild_finds_holes_and_cuts_tail() {
        let map = SlotMap::rebuild([3, 4, 50]);
        assert_eq!(map.len(), 51);
        assert_eq!(map.free_count(), 3 + 45);
        assert!(map.is_free(0) && map.is_free(49) && !map.is_free(50) && !map.is_free(4));
    }

    #[test]
    fn allocation_refuses_past_max_slots() {
        let mut map = SlotMap::rebuild([MAX_SLOTS - 1]);
        assert_eq!(map.allocate(1).map(|r| r.len()), Some(1)); // slot 0 is free
        assert_eq!(map.allocate(MAX_SLOTS), None);
    }
}
