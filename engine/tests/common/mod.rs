//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use replica::StoreOptions;
use trireme_engine::crypto::SecretKey;
use trireme_engine::{Engine, Segment, StorageClass, VolumeSpec};

/// An engine over a real store in `dir`, with a fixed master key.
pub fn engine(dir: &std::path::Path) -> Engine {
    Engine::open(dir, SecretKey::from_bytes([7; 32]), StoreOptions::default()).unwrap()
}

/// A local volume of `size` bytes in `tenant` (None: the default tenant).
pub fn spec(name: &str, size: u64, tenant: Option<&str>) -> VolumeSpec {
    VolumeSpec {
        name: name.into(),
        size,
        tenant: tenant.map(Into::into),
        class: StorageClass::Local,
        chunk_size: None,
    }
}

/// The bytes a read returned.
pub fn flatten(segs: Vec<Segment>) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segs {
        match s {
            Segment::Data(b) => out.extend_from_slice(&b),
            Segment::Zero(n) => out.resize(out.len() + usize::try_from(n).unwrap(), 0),
        }
    }
    out
}
