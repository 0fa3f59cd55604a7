//! Compact binary encoding of [`Message`]: little-endian integers, one tag byte per
//! variant, length-prefixed payloads. Decoding is bounds-checked: on hostile input it
//! returns an error, never panics, and never allocates more than the message limits
//! ([`MAX_PAYLOAD`] bytes per payload, [`MAX_SCAN_ENTRIES`] entries per scan).

use crate::msg::{MAX_PAYLOAD, MAX_SCAN_ENTRIES, Message, Reply, ReplyBody, Request, RequestBody};
use crate::types::{BlockIndex, BlockVersion, Content, Epoch, Payload, Seq};

/// Why a message did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message truncated")]
    Truncated,
    #[error("unknown tag {tag} for {what}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("{what} of {len} exceeds the limit {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// Encodes a message.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut w = Vec::with_capacity(64);
    match msg {
        Message::Request(r) => {
            w.push(1);
            w.extend_from_slice(&r.epoch.0.to_le_bytes());
            put_u64(&mut w, r.incarnation);
            put_u64(&mut w, r.op);
            encode_request(&mut w, &r.body);
        }
        Message::Reply(r) => {
            w.push(2);
            put_u64(&mut w, r.op);
            put_u64(&mut w, r.incarnation);
            encode_reply(&mut w, &r.body);
        }
    }
    w
}

/// Decodes a whole message; trailing bytes are an error.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf: bytes };
    let msg = match r.u8()? {
        1 => {
            let epoch = Epoch(r.u32()?);
            let incarnation = r.u64()?;
            let op = r.u64()?;
            let body = decode_request(&mut r)?;
            Message::Request(Request {
                epoch,
                incarnation,
                op,
                body,
            })
        }
        2 => {
            let op = r.u64()?;
            let incarnation = r.u64()?;
            let body = decode_reply(&mut r)?;
            Message::Reply(Reply {
                op,
                incarnation,
                body,
            })
        }
        tag => {
            return Err(DecodeError::UnknownTag {
                what: "message",
                tag,
            });
        }
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::Trailing(r.buf.len()));
    }
    Ok(msg)
}

fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_version(w: &mut Vec<u8>, v: &BlockVersion) {
    put_u64(w, v.seq.0);
    match &v.content {
        Content::Trim => w.push(0),
        Content::Data(p) => {
            w.push(1);
            w.extend_from_slice(&p.checksum.to_le_bytes());
            // Payloads are at most MAX_PAYLOAD bytes (asserted by the writer), far below
            // u32::MAX.
            w.extend_from_slice(
                &u32::try_from(p.bytes.len())
                    .unwrap_or(u32::MAX)
                    .to_le_bytes(),
            );
            w.extend_from_slice(&p.bytes);
        }
    }
}

fn put_opt_version(w: &mut Vec<u8>, v: Option<&BlockVersion>) {
    match v {
        None => w.push(0),
        Some(v) => {
            w.push(1);
            put_version(w, v);
        }
    }
}

fn encode_request(w: &mut Vec<u8>, body: &RequestBody) {
    match body {
        RequestBody::Status => w.push(0),
        RequestBody::Write {
            block,
            version,
            prev,
            fua,
        } => {
            w.push(1);
            put_u64(w, block.0);
            put_version(w, version);
            put_u64(w, prev.0);
            w.push(u8::from(*fua));
        }
        RequestBody::Flush => w.push(2),
        RequestBody::Read { block } => {
            w.push(3);
            put_u64(w, block.0);
        }
        RequestBody::Scan {
            since,
            start,
            end,
            limit,
        } => {
            w.push(4);
            put_u64(w, since.0);
            put_u64(w, start.0);
            put_u64(w, end.0);
            w.extend_from_slice(&limit.to_le_bytes());
        }
        RequestBody::Install {
            block,
            version,
            keep_from,
        } => {
            w.push(5);
            put_u64(w, block.0);
            put_opt_version(w, version.as_ref());
            put_u64(w, keep_from.0);
        }
        RequestBody::Repair { block, version } => {
            w.push(6);
            put_u64(w, block.0);
            put_version(w, version);
        }
        RequestBody::SetWatermark { seq } => {
            w.push(7);
            put_u64(w, seq.0);
        }
    }
}

fn encode_reply(w: &mut Vec<u8>, body: &ReplyBody) {
    match body {
        ReplyBody::Fenced { epoch } => {
            w.push(0);
            w.extend_from_slice(&epoch.0.to_le_bytes());
        }
        ReplyBody::Restarted => w.push(1),
        ReplyBody::Status { epoch, watermark } => {
            w.push(2);
            w.extend_from_slice(&epoch.0.to_le_bytes());
            put_u64(w, watermark.0);
        }
        ReplyBody::Applied => w.push(3),
        ReplyBody::Flushed => w.push(4),
        ReplyBody::Read { version } => {
            w.push(5);
            put_opt_version(w, version.as_ref());
        }
        ReplyBody::Scanned { entries, next } => {
            w.push(6);
            w.extend_from_slice(
                &u32::try_from(entries.len())
                    .unwrap_or(u32::MAX)
                    .to_le_bytes(),
            );
            for (b, v) in entries {
                put_u64(w, b.0);
                put_version(w, v);
            }
            match next {
                None => w.push(0),
                Some(b) => {
                    w.push(1);
                    put_u64(w, b.0);
                }
            }
        }
        ReplyBody::WatermarkSet { watermark } => {
            w.push(7);
            put_u64(w, watermark.0);
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(DecodeError::UnknownTag { what: "bool", tag }),
        }
    }

    fn version(&mut self) -> Result<BlockVersion, DecodeError> {
        let seq = Seq(self.u64()?);
        let content = match self.u8()? {
            0 => Content::Trim,
            1 => {
                let checksum = self.u32()?;
                let len = self.u32()?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > MAX_PAYLOAD {
                    return Err(DecodeError::TooLong {
                        what: "payload",
                        len: u64::try_from(len).unwrap_or(u64::MAX),
                        max: u64::try_from(MAX_PAYLOAD).unwrap_or(u64::MAX),
                    });
                }
                // `take` checks the length against the input before anything is copied.
                let bytes = self.take(len)?.to_vec();
                Content::Data(Payload { bytes, checksum })
            }
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "content",
                    tag,
                });
            }
        };
        Ok(BlockVersion { seq, content })
    }

    fn opt_version(&mut self) -> Result<Option<BlockVersion>, DecodeError> {
        Ok(if self.bool()? {
            Some(self.version()?)
        } else {
            None
        })
    }
}

fn decode_request(r: &mut Reader<'_>) -> Result<RequestBody, DecodeError> {
    Ok(match r.u8()? {
        0 => RequestBody::Status,
        1 => {
            let block = BlockIndex(r.u64()?);
            let version = r.version()?;
            let prev = Seq(r.u64()?);
            let fua = r.bool()?;
            RequestBody::Write {
                block,
                version,
                prev,
                fua,
            }
        }
        2 => RequestBody::Flush,
        3 => RequestBody::Read {
            block: BlockIndex(r.u64()?),
        },
        4 => {
            let since = Seq(r.u64()?);
            let start = BlockIndex(r.u64()?);
            let end = BlockIndex(r.u64()?);
            let limit = r.u32()?;
            if limit > MAX_SCAN_ENTRIES {
                return Err(DecodeError::TooLong {
                    what: "scan limit",
                    len: u64::from(limit),
                    max: u64::from(MAX_SCAN_ENTRIES),
                });
            }
            RequestBody::Scan {
                since,
                start,
                end,
                limit,
            }
        }
        5 => {
            let block = BlockIndex(r.u64()?);
            let version = r.opt_version()?;
            let keep_from = Seq(r.u64()?);
            RequestBody::Install {
                block,
                version,
                keep_from,
            }
        }
        6 => {
            let block = BlockIndex(r.u64()?);
            let version = r.version()?;
            RequestBody::Repair { block, version }
        }
        7 => RequestBody::SetWatermark { seq: Seq(r.u64()?) },
        tag => {
            return Err(DecodeError::UnknownTag {
                what: "request",
                tag,
            });
        }
    })
}

fn decode_reply(r: &mut Reader<'_>) -> Result<ReplyBody, DecodeError> {
    Ok(match r.u8()? {
        0 => ReplyBody::Fenced {
            epoch: Epoch(r.u32()?),
        },
        1 => ReplyBody::Restarted,
        2 => {
            let epoch = Epoch(r.u32()?);
            let watermark = Seq(r.u64()?);
            ReplyBody::Status { epoch, watermark }
        }
        3 => ReplyBody::Applied,
        4 => ReplyBody::Flushed,
        5 => ReplyBody::Read {
            version: r.opt_version()?,
        },
        6 => {
            let n = r.u32()?;
            if n > MAX_SCAN_ENTRIES {
                return Err(DecodeError::TooLong {
                    what: "scan entries",
                    len: u64::from(n),
                    max: u64::from(MAX_SCAN_ENTRIES),
                });
            }
            // n is bounded above, so this allocation is too.
            let mut entries = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
            for _ in 0..n {
                let b = BlockIndex(r.u64()?);
                entries.push((b, r.version()?));
            }
            let next = if r.bool()? {
                Some(BlockIndex(r.u64()?))
            } else {
                None
            };
            ReplyBody::Scanned { entries, next }
        }
        7 => ReplyBody::WatermarkSet {
            watermark: Seq(r.u64()?),
        },
        tag => return Err(DecodeError::UnknownTag { what: "reply", tag }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(b: u64, s: u64) -> BlockVersion {
        BlockVersion {
            seq: Seq(s),
            content: Content::Data(Payload::seal(BlockIndex(b), Seq(s), vec![9; 33])),
        }
    }

    fn samples() -> Vec<Message> {
        let req = |body| {
            Message::Request(Request {
                epoch: Epoch(5),
                incarnation: 3,
                op: 77,
                body,
            })
        };
        let rep = |body| {
            Message::Reply(Reply {
                op: 78,
                incarnation: 4,
                body,
            })
        };
        vec![
            req(RequestBody::Status),
            req(RequestBody::Write {
                block: BlockIndex(3),
                version: data(3, 10),
                prev: Seq(9),
                fua: true,
            }),
            req(RequestBody::Write {
                block: BlockIndex(3),
                version: BlockVersion {
                    seq: Seq(11),
                    content: Content::Trim,
                },
                prev: Seq(10),
                fua: false,
            }),
            req(RequestBody::Flush),
            req(RequestBody::Read {
                block: BlockIndex(u64::MAX),
            }),
            req(RequestBody::Scan {
                since: Seq(1),
                start: BlockIndex(0),
                end: BlockIndex(16),
                limit: 16,
            }),
            req(RequestBody::Install {
                block: BlockIndex(1),
                version: None,
                keep_from: Seq(4),
            }),
            req(RequestBody::Install {
                block: BlockIndex(1),
                version: Some(data(1, 2)),
                keep_from: Seq(4),
            }),
            req(RequestBody::Repair {
                block: BlockIndex(2),
                version: data(2, 8),
            }),
            req(RequestBody::SetWatermark { seq: Seq(99) }),
            rep(ReplyBody::Fenced { epoch: Epoch(6) }),
            rep(ReplyBody::Restarted),
            rep(ReplyBody::Status {
                epoch: Epoch(6),
                watermark: Seq(12),
            }),
            rep(ReplyBody::Applied),
            rep(ReplyBody::Flushed),
            rep(ReplyBody::Read { version: None }),
            rep(ReplyBody::Read {
                version: Some(data(4, 4)),
            }),
            rep(ReplyBody::Scanned {
                entries: vec![(BlockIndex(1), data(1, 2)), (BlockIndex(5), data(5, 3))],
                next: Some(BlockIndex(6)),
            }),
            rep(ReplyBody::Scanned {
                entries: vec![],
                next: None,
            }),
            rep(ReplyBody::WatermarkSet { watermark: Seq(3) }),
        ]
    }

    #[test]
    fn round_trips() {
        for m in samples() {
            let bytes = encode(&m);
            assert_eq!(decode(&bytes), Ok(m));
        }
    }

    #[test]
    fn truncation_and_trailing_bytes_are_errors() {
        for m in samples() {
            let bytes = encode(&m);
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(decode(&longer), Err(DecodeError::Trailing(1)));
        }
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocating() {
        // A scan reply claiming u32::MAX entries.
        let mut b = vec![2];
        b.extend_from_slice(&[0; 16]);
        b.push(6);
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&b), Err(DecodeError::TooLong { .. })));
        // A payload claiming 4 GiB.
        let mut b = vec![2];
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(&[5, 1]);
        b.extend_from_slice(&[0; 8]);
        b.push(1);
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&b), Err(DecodeError::TooLong { .. })));
    }

    #[test]
    fn garbage_never_panics() {
        // A small deterministic fuzz: mutate valid encodings byte by byte.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for m in samples() {
            let bytes = encode(&m);
            for _ in 0..200 {
                let mut b = bytes.clone();
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = usize::try_from(x % u64::try_from(b.len()).unwrap_or(1)).unwrap_or(0);
                b[i] = b[i].wrapping_add(u8::try_from(x >> 56).unwrap_or(1) | 1);
                let _ = decode(&b);
            }
        }
    }
}
