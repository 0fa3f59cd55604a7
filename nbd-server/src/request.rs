//! Transmission-phase request parser: bytes in, validated typed requests out. Every
//! offset, length and flag is checked against the export and the negotiated options here,
//! before any I/O, so the code that talks to the `Export` only sees requests it may run.
//!
//! Bounds for hostile clients: at most one request header plus [`MAX_PAYLOAD`] bytes of
//! payload are buffered beyond one driver read; a bigger payload is a protocol violation
//! (the protocol allows a hard disconnect) and is never allocated.

use bytes::{Bytes, BytesMut};

use crate::config::MAX_PAYLOAD;
use crate::cursor::Cursor;
use crate::handshake::Negotiated;
use crate::reply::ReplyMode;
use crate::wire;

/// A command with its validated arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// NBD_CMD_READ of `len` bytes (at most [`MAX_PAYLOAD`]).
    Read {
        /// Bytes to read.
        len: u64,
        /// NBD_CMD_FLAG_DF: send the data as one chunk.
        dont_fragment: bool,
    },
    /// NBD_CMD_WRITE of `data`.
    Write {
        /// The payload (at most [`MAX_PAYLOAD`] bytes).
        data: Bytes,
        /// NBD_CMD_FLAG_FUA.
        fua: bool,
    },
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim {
        /// Bytes to discard.
        len: u64,
        /// NBD_CMD_FLAG_FUA.
        fua: bool,
    },
    /// NBD_CMD_CACHE.
    Cache {
        /// Bytes to prefetch.
        len: u64,
    },
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes {
        /// Bytes to zero.
        len: u64,
        /// No NBD_CMD_FLAG_NO_HOLE: space may be freed.
        may_unmap: bool,
        /// NBD_CMD_FLAG_FAST_ZERO: fail unless zeroing is cheap.
        fast_only: bool,
        /// NBD_CMD_FLAG_FUA.
        fua: bool,
    },
    /// NBD_CMD_BLOCK_STATUS for `base:allocation`.
    BlockStatus {
        /// Bytes of interest (non-zero).
        len: u64,
        /// NBD_CMD_FLAG_REQ_ONE: one extent only.
        req_one: bool,
    },
}

/// A request that passed validation: `offset` and the command's length lie within the
/// export and every flag is valid for the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Echoed in the reply.
    pub cookie: u64,
    /// Start of the range.
    pub offset: u64,
    /// What to do.
    pub command: Command,
}

impl Request {
    /// Payload bytes this request holds in memory while being served (READ data to
    /// send or WRITE data to store).
    pub fn payload_bytes(&self) -> u64 {
        match &self.command {
            Command::Read { len, .. } => *len,
            Command::Write { data, .. } => u64::try_from(data.len()).unwrap_or(u64::MAX),
            _ => 0,
        }
    }
}

/// Why the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// The request header did not carry the expected magic.
    #[error("bad request magic {0:#x}")]
    BadMagic(u32),
    /// The client announced a payload larger than the server accepts.
    #[error("request payload of {0} bytes exceeds the limit of {MAX_PAYLOAD} bytes")]
    PayloadTooLarge(u64),
}

/// What the parser produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseEvent {
    /// A valid request to serve.
    Request(Request),
    /// An invalid request, answered with `errno` without any I/O.
    Reject {
        /// Echoed in the reply.
        cookie: u64,
        /// Echoed in extended replies.
        offset: u64,
        /// NBD error value.
        errno: u32,
        /// Why, for the client's user.
        message: String,
    },
    /// NBD_CMD_DISC: finish outstanding requests, then close.
    Disconnect,
    /// The client broke the protocol; close now.
    Violation(Violation),
}

/// Most room [`RequestParser::read_buffer`] reserves for a payload that has not
/// arrived yet.
pub const READ_AHEAD_MAX: usize = 4 << 20;

/// A request header waiting for its payload.
#[derive(Debug, Clone, Copy)]
struct Header {
    flags: u16,
    ty: u16,
    cookie: u64,
    offset: u64,
    length: u64,
    payload: usize,
}

/// Turns the client's byte stream into requests for one connection.
#[derive(Debug)]
pub struct RequestParser {
    input: BytesMut,
    pending: Option<Header>,
    finished: bool,
    header_len: usize,
    size: u64,
    read_only: bool,
    mode: ReplyMode,
    base_allocation: bool,
    block_size_requested: bool,
}

impl RequestParser {
    /// A parser for the options in `negotiated`, starting with bytes already received.
    pub fn new(negotiated: &Negotiated, leftover: BytesMut) -> Self {
        let header_len = if negotiated.mode == ReplyMode::Extended {
            wire::EXTENDED_REQUEST_HEADER_LEN
        } else {
            wire::REQUEST_HEADER_LEN
        };
        RequestParser {
            input: leftover,
            pending: None,
            finished: false,
            header_len,
            size: negotiated.size,
            read_only: negotiated.read_only,
            mode: negotiated.mode,
            base_allocation: negotiated.base_allocation,
            block_size_requested: negotiated.block_size_requested,
        }
    }

    /// Feeds bytes received from the client.
    pub fn receive(&mut self, data: &[u8]) {
        if !self.finished {
            self.input.extend_from_slice(data);
        }
    }

    /// The buffer to read the client's next bytes into (appending; for drivers that
    /// read straight into it rather than calling [`RequestParser::receive`]), with at
    /// least `chunk` bytes of spare room, and room for the rest of the payload of a
    /// request whose header has arrived, up to [`READ_AHEAD_MAX`]: a write's data then
    /// lands in one buffer and is handed on without a copy. The room reserved ahead of
    /// the data stays bounded, so a client announcing large writes and sending nothing
    /// holds little memory.
    pub fn read_buffer(&mut self, chunk: usize) -> &mut BytesMut {
        if self.finished {
            self.input.clear();
        }
        let rest = self
            .pending
            .map_or(0, |h| h.payload.saturating_sub(self.input.len()))
            .min(READ_AHEAD_MAX);
        let want = rest.max(chunk);
        if self.input.capacity() - self.input.len() < want {
            self.input.reserve(want);
        }
        &mut self.input
    }

    /// Bytes received but not consumed yet.
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    /// The next event, or `None` when more bytes are needed (or the stream ended with a
    /// disconnect or violation).
    pub fn poll(&mut self) -> Option<ParseEvent> {
        if self.finished {
            return None;
        }
        let header = match self.pending {
            Some(header) => header,
            None => {
                if self.input.len() < self.header_len {
                    return None;
                }
                let raw = self.input.split_to(self.header_len);
                match self.parse_header(&raw) {
                    Ok(header) => header,
                    Err(violation) => return Some(self.violation(violation)),
                }
            }
        };
        if self.input.len() < header.payload {
            self.pending = Some(header);
            return None;
        }
        self.pending = None;
        let payload = self.input.split_to(header.payload).freeze();
        Some(self.validate(header, payload))
    }

    fn violation(&mut self, violation: Violation) -> ParseEvent {
        self.finished = true;
        self.input = BytesMut::new();
        ParseEvent::Violation(violation)
    }

    fn parse_header(&self, raw: &[u8]) -> Result<Header, Violation> {
        let mut c = Cursor::new(raw);
        let extended = self.mode == ReplyMode::Extended;
        let (Some(magic), Some(flags), Some(ty), Some(cookie), Some(offset)) =
            (c.u32(), c.u16(), c.u16(), c.u64(), c.u64())
        else {
            return Err(Violation::BadMagic(0));
        };
        let length = if extended {
            c.u64()
        } else {
            c.u32().map(u64::from)
        };
        let Some(length) = length else {
            return Err(Violation::BadMagic(magic));
        };
        let expected = if extended {
            wire::EXTENDED_REQUEST_MAGIC
        } else {
            wire::REQUEST_MAGIC
        };
        if magic != expected {
            return Err(Violation::BadMagic(magic));
        }
        // WRITE always carries `length` bytes; with extended headers any command may
        // announce a payload with NBD_CMD_FLAG_PAYLOAD_LEN (consumed, then refused).
        let has_payload =
            ty == wire::CMD_WRITE || (extended && flags & wire::CMD_FLAG_PAYLOAD_LEN != 0);
        let payload = if has_payload { length } else { 0 };
        if payload > u64::from(MAX_PAYLOAD) {
            return Err(Violation::PayloadTooLarge(payload));
        }
        let payload = usize::try_from(payload).map_err(|_| Violation::PayloadTooLarge(payload))?;
        Ok(Header {
            flags,
            ty,
            cookie,
            offset,
            length,
            payload,
        })
    }

    fn validate(&mut self, h: Header, payload: Bytes) -> ParseEvent {
        let reject = |errno: u32, message: String| ParseEvent::Reject {
            cookie: h.cookie,
            offset: h.offset,
            errno,
            message,
        };
        let structured = self.mode >= ReplyMode::Structured;
        let extended = self.mode == ReplyMode::Extended;
        let mut allowed = wire::CMD_FLAG_FUA;
        let writes = match h.ty {
            wire::CMD_DISC => {
                self.finished = true;
                self.input = BytesMut::new();
                return ParseEvent::Disconnect;
            }
            wire::CMD_READ => {
                if structured {
                    allowed |= wire::CMD_FLAG_DF;
                }
                false
            }
            wire::CMD_WRITE => {
                if extended {
                    allowed |= wire::CMD_FLAG_PAYLOAD_LEN;
                }
                true
            }
            wire::CMD_WRITE_ZEROES => {
                allowed |= wire::CMD_FLAG_NO_HOLE | wire::CMD_FLAG_FAST_ZERO;
                true
            }
            wire::CMD_TRIM => true,
            wire::CMD_BLOCK_STATUS => {
                allowed |= wire::CMD_FLAG_REQ_ONE;
                false
            }
            wire::CMD_FLUSH | wire::CMD_CACHE => false,
            other => return reject(wire::EINVAL, format!("unknown command {other}")),
        };
        if h.flags & !allowed != 0 {
            return reject(
                wire::EINVAL,
                format!("flags {:#x} are not valid for command {}", h.flags, h.ty),
            );
        }
        if writes && self.read_only {
            return reject(wire::EPERM, "export is read-only".into());
        }
        if h.ty == wire::CMD_FLUSH {
            // Offset and length are reserved for FLUSH.
            return ParseEvent::Request(Request {
                cookie: h.cookie,
                offset: 0,
                command: Command::Flush,
            });
        }
        let in_bounds = h
            .offset
            .checked_add(h.length)
            .is_some_and(|end| end <= self.size);
        if !in_bounds {
            let errno = if matches!(h.ty, wire::CMD_WRITE | wire::CMD_WRITE_ZEROES) {
                wire::ENOSPC
            } else {
                wire::EINVAL
            };
            return reject(
                errno,
                format!(
                    "range {}+{} is beyond the export size {}",
                    h.offset, h.length, self.size
                ),
            );
        }
        let fua = h.flags & wire::CMD_FLAG_FUA != 0;
        let over_max = h.length > u64::from(MAX_PAYLOAD);
        let command = match h.ty {
            wire::CMD_READ => {
                if over_max {
                    return reject(
                        wire::EINVAL,
                        format!("read longer than {MAX_PAYLOAD} bytes"),
                    );
                }
                Command::Read {
                    len: h.length,
                    dont_fragment: h.flags & wire::CMD_FLAG_DF != 0,
                }
            }
            wire::CMD_WRITE => Command::Write { data: payload, fua },
            wire::CMD_TRIM => Command::Trim { len: h.length, fua },
            wire::CMD_CACHE => {
                if over_max && self.block_size_requested {
                    return reject(
                        wire::EINVAL,
                        format!("cache longer than {MAX_PAYLOAD} bytes"),
                    );
                }
                Command::Cache { len: h.length }
            }
            wire::CMD_WRITE_ZEROES => {
                // No payload, so no length limit: QEMU (with extended headers) zeroes
                // ranges far beyond the maximum block size in one request.
                Command::WriteZeroes {
                    len: h.length,
                    may_unmap: h.flags & wire::CMD_FLAG_NO_HOLE == 0,
                    fast_only: h.flags & wire::CMD_FLAG_FAST_ZERO != 0,
                    fua,
                }
            }
            wire::CMD_BLOCK_STATUS => {
                if !self.base_allocation {
                    return reject(
                        wire::EINVAL,
                        "no metadata context was negotiated for this export".into(),
                    );
                }
                if h.length == 0 {
                    return reject(wire::EINVAL, "block status needs a non-zero length".into());
                }
                Command::BlockStatus {
                    len: h.length,
                    req_one: h.flags & wire::CMD_FLAG_REQ_ONE != 0,
                }
            }
            other => return reject(wire::EINVAL, format!("unknown command {other}")),
        };
        ParseEvent::Request(Request {
            cookie: h.cookie,
            offset: h.offset,
            command,
        })
    }
}
