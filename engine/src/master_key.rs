//! The cluster master key file: created once at cluster init, mode 0600, never logged.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::crypto::{KEY_LEN, SecretKey};

/// Errors reading or creating the master key file.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    /// The file could not be read or written.
    #[error("{op} master key file {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file exists but is not a key.
    #[error("master key file {0} is malformed (expected {KEY_LEN} bytes)")]
    Malformed(String),
    /// Other users can read the file.
    #[error("master key file {0} is readable by group or others; chmod 600 it")]
    Permissions(String),
    /// No random bytes.
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MasterKeyError {
    let path = path.display().to_string();
    move |source| MasterKeyError::Io { op, path, source }
}

/// Create the master key at `path` unless it exists, crash-safely and with mode 0600.
/// Returns whether a key was created.
pub fn create_if_missing(path: &Path) -> Result<bool, MasterKeyError> {
    if path.exists() {
        return Ok(false);
    }
    let key = SecretKey::generate()?;
    crate::crashsafe::write_file(path, key.expose(), 0o600).map_err(io_err("writing", path))?;
    Ok(true)
}

/// Load the master key from `path`, refusing a file others can read.
pub fn load(path: &Path) -> Result<SecretKey, MasterKeyError> {
    let mut f = File::open(path).map_err(io_err("opening", path))?;
    let meta = f.metadata().map_err(io_err("reading", path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(MasterKeyError::Permissions(path.display().to_string()));
    }
    let mut buf = Vec::with_capacity(KEY_LEN + 1);
    Read::by_ref(&mut f)
        .take(u64::try_from(KEY_LEN).unwrap_or(32) + 1)
        .read_to_end(&mut buf)
        .map_err(io_err("reading", path))?;
    let bytes: [u8; KEY_LEN] = buf
        .as_slice()
        .try_into()
        .map_err(|_| MasterKeyError::Malformed(path.display().to_string()))?;
    Ok(SecretKey::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        assert!(create_if_missing(&p).unwrap());
        let k1 = load(&p).unwrap();
        assert!(!create_if_missing(&p).unwrap());
        assert_eq!(load(&p).unwrap().expose(), k1.expose());
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load(&p), Err(MasterKeyError::Permissions(_))));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&p, b"short").unwrap();
        assert!(matches!(load(&p), Err(MasterKeyError::Malformed(_))));
    }
}
