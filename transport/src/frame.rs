//! Length-prefixed frames on QUIC streams: a big-endian `u32` length, then that many
//! opaque bytes. One request frame and one response frame per bidirectional stream.
//! The length is checked against a cap before anything is allocated, and the buffer
//! grows only as bytes actually arrive, so a lying prefix costs nothing.

use quinn::{ReadError, ReadExactError, RecvStream, SendStream, VarInt, WriteError};

/// Default cap on a frame's payload: 64 MiB.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 64 << 20;

/// Capacity reserved up front for a frame; beyond it the buffer grows with the data.
const INITIAL_CAPACITY: usize = 64 << 10;

/// Stream error codes (QUIC application error codes on `RESET_STREAM` and
/// `STOP_SENDING`) this crate sends.
pub mod code {
    use quinn::VarInt;

    /// The frame's length prefix exceeds the receiver's cap.
    pub const FRAME_TOO_LARGE: VarInt = VarInt::from_u32(1);
    /// The request frame was malformed (truncated) or arrived too slowly.
    pub const BAD_REQUEST: VarInt = VarInt::from_u32(2);
    /// The application dropped the request without answering it.
    pub const NO_RESPONSE: VarInt = VarInt::from_u32(3);
    /// A fault plan failed the request (tests only).
    pub const FAULT_INJECTED: VarInt = VarInt::from_u32(4);
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading a frame: its length prefix exceeds the cap.
    #[error("frame of {len} bytes exceeds the cap of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The cap.
        max: u32,
    },
    /// Reading a frame: the stream ended before the frame did.
    #[error("stream ended after {received} of {expected} frame bytes")]
    Truncated {
        /// Bytes announced (prefix included).
        expected: u64,
        /// Bytes received (prefix included).
        received: u64,
    },
    /// The peer aborted the stream with this code: reset it while we read, or asked us
    /// to stop while we wrote.
    #[error("peer aborted the stream (code {0})")]
    Reset(VarInt),
    /// Reading a frame from the stream.
    #[error("reading a frame")]
    Read(#[source] ReadError),
    /// Writing a frame to the stream.
    #[error("writing a frame")]
    Write(#[source] WriteError),
    /// Finishing the stream after the frame.
    #[error("finishing the stream: {0}")]
    Finish(#[source] quinn::ClosedStream),
}

impl From<WriteError> for FrameError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Stopped(code) => Self::Reset(code),
            other => Self::Write(other),
        }
    }
}

impl From<ReadError> for FrameError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Reset(code) => Self::Reset(code),
            other => Self::Read(other),
        }
    }
}

/// Write `payload` as one frame and finish the stream. The caller checked the length
/// against the peer's cap; here it must only fit the `u32` prefix.
pub(crate) async fn write_frame(send: &mut SendStream, payload: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: u64::try_from(payload.len()).unwrap_or(u64::MAX),
        max: u32::MAX,
    })?;
    send.write_all(&len.to_be_bytes()).await?;
    send.write_all(payload).await?;
    send.finish().map_err(FrameError::Finish)
}

/// Read one frame of at most `max` payload bytes.
pub(crate) async fn read_frame(recv: &mut RecvStream, max: u32) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.map_err(|e| match e {
        ReadExactError::FinishedEarly(received) => FrameError::Truncated {
            expected: 4,
            received: u64::try_from(received).unwrap_or(u64::MAX),
        },
        ReadExactError::ReadError(e) => e.into(),
    })?;
    let len = u32::from_be_bytes(prefix);
    if len > max {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max,
        });
    }
    // u32 fits in usize on every target quinn supports (32 and 64 bits).
    let len = usize::try_from(len).map_err(|_| FrameError::TooLarge {
        len: u64::from(len),
        max,
    })?;
    let mut payload = Vec::with_capacity(len.min(INITIAL_CAPACITY));
    while payload.len() < len {
        let want = len - payload.len();
        match recv.read_chunk(want, true).await? {
            Some(chunk) => payload.extend_from_slice(&chunk.bytes),
            None => {
                return Err(FrameError::Truncated {
                    expected: 4 + u64::try_from(len).unwrap_or(u64::MAX),
                    received: 4 + u64::try_from(payload.len()).unwrap_or(u64::MAX),
                });
            }
        }
    }
    Ok(payload)
}
