//! Per-block AES-256-GCM and the key hierarchy (master key -> tenant key -> volume key).
//!
//! Nonce scheme: a block's 96-bit nonce is its version number (64 bits, big-endian)
//! followed by 32 zero bits. Every block version of a volume is drawn once from that
//! volume's counter (see `sequence.rs`), which is persisted ahead of use, so a version —
//! and with it a nonce — is never used twice under one volume key, across restarts and
//! crashes included. Each volume has its own random key, so counters of different
//! volumes never share a key.
//!
//! The associated data binds tenant id, volume id, block index and version: a block
//! moved to another index, replayed from an older version, or read with another
//! tenant's or volume's key fails its tag.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use zeroize::Zeroize;

/// Length of every key in the hierarchy.
pub const KEY_LEN: usize = 32;
/// Length of a GCM tag.
pub const TAG_LEN: usize = 16;
const WRAP_NONCE_LEN: usize = 12;
/// Length of a wrapped key: nonce, ciphertext, tag.
pub const WRAPPED_LEN: usize = WRAP_NONCE_LEN + KEY_LEN + TAG_LEN;

/// Errors of the key hierarchy and block cipher.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A tag did not verify: wrong key, or data altered, moved or replayed.
    #[error("authentication failed (wrong key or altered data)")]
    Authentication,
    /// A wrapped key has the wrong length or encoding.
    #[error("malformed wrapped key")]
    MalformedWrappedKey,
    /// The system random source failed.
    #[error("random source failed: {0}")]
    Random(String),
}

/// A 256-bit secret key, wiped from memory when dropped; never printed.
#[derive(Clone)]
pub struct SecretKey([u8; KEY_LEN]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl SecretKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = [0u8; KEY_LEN];
        fill_random(&mut k)?;
        Ok(SecretKey(k))
    }

    /// A key from its bytes (used when loading the master key file).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        SecretKey(bytes)
    }

    /// The raw bytes, for writing the master key file only.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn aead(&self) -> LessSafeKey {
        // A 32-byte key is always valid for AES-256-GCM.
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &self.0)
                .unwrap_or_else(|_| unreachable!("AES-256-GCM refused a 32-byte key")),
        )
    }

    /// Encrypt `key` under this key; `context` (e.g. "tenant:acme") is bound as
    /// associated data so a wrapped key cannot be swapped onto another record.
    pub fn wrap(&self, key: &SecretKey, context: &str) -> Result<[u8; WRAPPED_LEN], CryptoError> {
        let mut out = [0u8; WRAPPED_LEN];
        let (nonce, rest) = out.split_at_mut(WRAP_NONCE_LEN);
        // Wrapping happens once per tenant or volume: random nonces are far below the
        // 2^32 messages per key that random 96-bit nonces allow.
        fill_random(nonce)?;
        let (body, tag_out) = rest.split_at_mut(KEY_LEN);
        body.copy_from_slice(&key.0);
        let nonce: [u8; WRAP_NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| CryptoError::MalformedWrappedKey)?;
        let tag = self
            .aead()
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                body,
            )
            .map_err(|_| CryptoError::Authentication)?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypt a key wrapped by `wrap` with the same `context`.
    pub fn unwrap_key(&self, wrapped: &[u8], context: &str) -> Result<SecretKey, CryptoError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(CryptoError::MalformedWrappedKey);
        }
        let (nonce, rest) = wrapped.split_at(WRAP_NONCE_LEN);
        let (body, tag) = rest.split_at(KEY_LEN);
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(body);
        let nonce: [u8; WRAP_NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| CryptoError::MalformedWrappedKey)?;
        let tag: [u8; TAG_LEN] = tag
            .try_into()
            .map_err(|_| CryptoError::MalformedWrappedKey)?;
        let result = self.aead().open_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(context.as_bytes()),
            Tag::from(tag),
            &mut key,
            0..,
        );
        match result {
            Ok(_) => Ok(SecretKey(key)),
            Err(_) => {
                key.zeroize();
                Err(CryptoError::Authentication)
            }
        }
    }
}

/// Where a block sits, bound into its tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockAddress {
    /// Tenant id.
    pub tenant: u64,
    /// Volume id.
    pub volume: u64,
    /// Block index within the volume.
    pub block: u64,
    /// Block version (also the nonce).
    pub version: u64,
}

impl BlockAddress {
    fn aad(&self) -> [u8; 36] {
        let mut a = [0u8; 36];
        a[..4].copy_from_slice(b"TRB1");
        a[4..12].copy_from_slice(&self.tenant.to_be_bytes());
        a[12..20].copy_from_slice(&self.volume.to_be_bytes());
        a[20..28].copy_from_slice(&self.block.to_be_bytes());
        a[28..36].copy_from_slice(&self.version.to_be_bytes());
        a
    }

    fn nonce(&self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&self.version.to_be_bytes());
        n
    }
}

/// The cipher of one volume's blocks (ring's AES-GCM: AES-NI and carry-less
/// multiplication in assembly, several times faster than a portable implementation;
/// see the `block` criterion benches).
pub struct BlockCipher {
    aead: LessSafeKey,
}

impl std::fmt::Debug for BlockCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlockCipher(..)")
    }
}

impl BlockCipher {
    /// A cipher for the volume key `key`.
    pub fn new(key: &SecretKey) -> Self {
        BlockCipher { aead: key.aead() }
    }

    /// Encrypt `data` in place and return its tag.
    pub fn seal(&self, addr: &BlockAddress, data: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(addr.nonce()),
                Aad::from(addr.aad()),
                data,
            )
            // AES-GCM sealing fails only for messages over 64 GiB; a block is 4 KiB.
            .unwrap_or_else(|_| unreachable!("AES-GCM refused a 4 KiB block"));
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Verify `tag` and decrypt `data` in place. On failure the content of `data` is
    /// unspecified and must not be used.
    pub fn open(
        &self,
        addr: &BlockAddress,
        data: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), CryptoError> {
        self.aead
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(addr.nonce()),
                Aad::from(addr.aad()),
                Tag::from(*tag),
                data,
                0..,
            )
            .map(|_| ())
            .map_err(|_| CryptoError::Authentication)
    }
}

/// Fill `buf` from the operating system's random source.
pub fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(block: u64, version: u64) -> BlockAddress {
        BlockAddress {
            tenant: 1,
            volume: 2,
            block,
            version,
        }
    }

    #[test]
    fn block_round_trip() {
        let key = SecretKey::generate().unwrap();
        let c = BlockCipher::new(&key);
        let mut data = vec![0x5au8; 4096];
        let tag = c.seal(&addr(7, 9), &mut data);
        assert_ne!(data, vec![0x5au8; 4096]);
        c.open(&addr(7, 9), &mut data, &tag).unwrap();
        assert_eq!(data, vec![0x5au8; 4096]);
    }

    #[test]
    fn moved_replayed_or_foreign_blocks_fail() {
        let key = SecretKey::generate().unwrap();
        let c = BlockCipher::new(&key);
        let mut data = vec![1u8; 4096];
        let tag = c.seal(&addr(7, 9), &mut data);
        for wrong in [
            addr(8, 9),
            addr(7, 8),
            BlockAddress {
                tenant: 3,
                ..addr(7, 9)
            },
        ] {
            let mut d = data.clone();
            assert!(matches!(
                c.open(&wrong, &mut d, &tag),
                Err(CryptoError::Authentication)
            ));
        }
        let other = BlockCipher::new(&SecretKey::generate().unwrap());
        let mut d = data.clone();
        assert!(other.open(&addr(7, 9), &mut d, &tag).is_err());
        let mut flipped = data.clone();
        flipped[100] ^= 1;
        assert!(c.open(&addr(7, 9), &mut flipped, &tag).is_err());
    }

    #[test]
    fn wrap_binds_context() {
        let kek = SecretKey::generate().unwrap();
        let k = SecretKey::generate().unwrap();
        let w = kek.wrap(&k, "tenant:a").unwrap();
        assert_eq!(kek.unwrap_key(&w, "tenant:a").unwrap().expose(), k.expose());
        assert!(kek.unwrap_key(&w, "tenant:b").is_err());
        let other = SecretKey::generate().unwrap();
        assert!(other.unwrap_key(&w, "tenant:a").is_err());
        assert!(matches!(
            kek.unwrap_key(&w[1..], "tenant:a"),
            Err(CryptoError::MalformedWrappedKey)
        ));
    }
}
