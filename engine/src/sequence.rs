//! A volume's version counter, persisted ahead of use.
//!
//! Every block version (and so every nonce, see `crypto.rs`) is drawn from here. The
//! counter durably records a reservation `reserved` before handing out any version
//! below it; after a restart or a crash it resumes at the recorded reservation, which
//! is above every version ever handed out. Versions are also the order of writes to a
//! block: a newer write always has a larger version.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::catalog::{MetaError, MetaKv, sequence_key};

/// Versions reserved per durable metadata write.
const RESERVATION: u64 = 1 << 20;

/// Hands out unique, increasing block versions for one volume.
pub struct VersionCounter {
    meta: Arc<dyn MetaKv>,
    key: String,
    state: Mutex<(u64, u64)>, // (next, reserved)
}

impl std::fmt::Debug for VersionCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (next, reserved) = *self.state.lock();
        f.debug_struct("VersionCounter")
            .field("next", &next)
            .field("reserved", &reserved)
            .finish()
    }
}

impl VersionCounter {
    /// Resume the counter of `volume_id` (starting at 1 for a new volume).
    pub fn open(meta: Arc<dyn MetaKv>, volume_id: u64) -> Result<Self, MetaError> {
        let key = sequence_key(volume_id);
        let start = match meta.get(&key)? {
            Some(v) => {
                let bytes: [u8; 8] = v
                    .as_slice()
                    .try_into()
                    .map_err(|_| MetaError(format!("version reservation {key} is malformed")))?;
                u64::from_be_bytes(bytes)
            }
            None => 1,
        };
        let reserved = start
            .checked_add(RESERVATION)
            .ok_or_else(|| MetaError(format!("version counter {key} exhausted")))?;
        meta.put(&key, &reserved.to_be_bytes())?;
        Ok(VersionCounter {
            meta,
            key,
            state: Mutex::new((start, reserved)),
        })
    }

    /// Take `n` consecutive versions; returns the first.
    pub fn take(&self, n: u64) -> Result<u64, MetaError> {
        let mut state = self.state.lock();
        let (next, reserved) = *state;
        let end = next
            .checked_add(n)
            .ok_or_else(|| MetaError("version counter exhausted".into()))?;
        if end > reserved {
            let new_reserved = end
                .checked_add(RESERVATION)
                .ok_or_else(|| MetaError("version counter exhausted".into()))?;
            // Durable before any version below it is used.
            self.meta.put(&self.key, &new_reserved.to_be_bytes())?;
            state.1 = new_reserved;
        }
        state.0 = end;
        Ok(next)
    }

    /// Forget the counter (volume deleted).
    pub fn remove(meta: &dyn MetaKv, volume_id: u64) -> Result<(), MetaError> {
        meta.delete(&sequence_key(volume_id))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// An in-memory `MetaKv` for unit tests.
    #[derive(Default)]
    pub(crate) struct MemKv(pub Mutex<BTreeMap<String, Vec<u8>>>);

    impl MetaKv for MemKv {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, MetaError> {
            Ok(self.0.lock().get(key).cloned())
        }
        fn put(&self, key: &str, value: &[u8]) -> Result<(), MetaError> {
            self.0.lock().insert(key.to_string(), value.to_vec());
            Ok(())
        }
        fn delete(&self, key: &str) -> Result<(), MetaError> {
            self.0.lock().remove(key);
            Ok(())
        }
        fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, MetaError> {
            Ok(self
                .0
                .lock()
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }
    }

    #[test]
    fn versions_never_repeat_across_restarts() {
        let kv: Arc<dyn MetaKv> = Arc::new(MemKv::default());
        let c = VersionCounter::open(kv.clone(), 7).unwrap();
        let a = c.take(3).unwrap();
        let b = c.take(RESERVATION).unwrap(); // crosses a reservation
        assert_eq!(b, a + 3);
        let last = c.take(1).unwrap();
        drop(c); // a crash: nothing but the reservation survives
        let c2 = VersionCounter::open(kv, 7).unwrap();
        assert!(c2.take(1).unwrap() > last);
    }
}
