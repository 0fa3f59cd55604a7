//! Runs one validated request against an `Export` and encodes the reply frame. This is
//! the only place where protocol requests meet storage calls.

use crate::export::{Export, ExportError};
use crate::reply::{Frame, ReplyEncoder};
use crate::request::{Command, Request};
use crate::wire;

/// Serves `request` on `export` and returns the reply to send.
pub async fn execute(export: &dyn Export, encoder: &ReplyEncoder, request: Request) -> Frame {
    let Request {
        cookie,
        offset,
        command,
    } = request;
    let mut fast_zero = false;
    let result = match command {
        Command::Read { len, dont_fragment } => match export.read(offset, len).await {
            Ok(segments) => {
                return encoder
                    .read(cookie, offset, len, segments, dont_fragment)
                    .unwrap_or_else(|e| {
                        tracing::error!(offset, len, error = %e, "export broke the read contract");
                        encoder.error(cookie, offset, wire::EIO, &e.to_string())
                    });
            }
            Err(e) => Err(e),
        },
        Command::Write { data, fua } => {
            if data.is_empty() {
                Ok(())
            } else {
                export.write(offset, data, fua).await
            }
        }
        Command::Flush => export.flush().await,
        Command::Trim { len, fua } => {
            if len == 0 {
                Ok(())
            } else {
                export.trim(offset, len, fua).await
            }
        }
        Command::Cache { len } => {
            if len == 0 {
                Ok(())
            } else {
                export.cache(offset, len).await
            }
        }
        Command::WriteZeroes {
            len,
            may_unmap,
            fast_only,
            fua,
        } => {
            fast_zero = fast_only;
            if len == 0 {
                Ok(())
            } else {
                export
                    .write_zeroes(offset, len, may_unmap, fast_only, fua)
                    .await
            }
        }
        Command::BlockStatus { len, req_one } => match export.block_status(offset, len).await {
            Ok(extents) => {
                return encoder
                    .block_status(cookie, offset, len, &extents, req_one)
                    .unwrap_or_else(|e| {
                        tracing::error!(offset, len, error = %e, "export broke the block status contract");
                        encoder.error(cookie, offset, wire::EIO, &e.to_string())
                    });
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => encoder.ok(cookie, offset),
        Err(e) => {
            tracing::debug!(offset, error = %e, "request failed");
            encoder.error(cookie, offset, errno_for(&e, fast_zero), &e.to_string())
        }
    }
}

/// The error value to send for `error`. The protocol reserves ENOTSUP for a refused
/// fast zero; any other "not supported" is reported as EINVAL.
pub(crate) fn errno_for(error: &ExportError, fast_zero: bool) -> u32 {
    let errno = error.nbd_errno();
    if errno == wire::ENOTSUP && !fast_zero {
        wire::EINVAL
    } else {
        errno
    }
}
