//! Transmission core: request validation, reply encoding and dispatch to an export.

use std::sync::Arc;

use bytes::Bytes;

use super::support::*;
use crate::config::MAX_PAYLOAD;
use crate::dispatch::{errno_for, execute};
use crate::export::{
    Export, ExportError, ExportHandle, Extent, ReadSegment, STATE_HOLE, STATE_ZERO,
};
use crate::handshake::{Negotiated, transmission_flags};
use crate::reply::{ReplyEncoder, ReplyError, ReplyMode, clip_extents};
use crate::request::{Command, ParseEvent, Request, RequestParser, Violation};
use crate::testing::MemExport;
use crate::wire;

fn negotiated(mode: ReplyMode, read_only: bool, base_allocation: bool) -> Negotiated {
    let export = if read_only {
        MemExport::new(VOL_SIZE).read_only()
    } else {
        MemExport::new(VOL_SIZE)
    };
    let export: Arc<dyn Export> = Arc::new(export);
    Negotiated {
        transmission_flags: transmission_flags(export.as_ref(), mode),
        export: ExportHandle {
            name: "vol".into(),
            description: String::new(),
            export,
        },
        size: VOL_SIZE,
        read_only,
        mode,
        base_allocation,
        block_size_requested: true,
        tls: false,
    }
}

fn parse(n: &Negotiated, bytes: &[u8]) -> Vec<ParseEvent> {
    let mut p = RequestParser::new(n, no_leftover());
    p.receive(bytes);
    std::iter::from_fn(|| p.poll()).collect()
}

fn errno_of(event: &ParseEvent) -> u32 {
    match event {
        ParseEvent::Reject { errno, .. } => *errno,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn valid_requests_are_typed() {
    let n = negotiated(ReplyMode::Structured, false, true);
    let mut bytes = req(wire::CMD_FLAG_DF, wire::CMD_READ, 7, 4096, 512);
    bytes.extend(req(wire::CMD_FLAG_FUA, wire::CMD_WRITE, 8, 0, 3));
    bytes.extend(b"abc");
    bytes.extend(req(0, wire::CMD_FLUSH, 9, 0, 0));
    bytes.extend(req(
        wire::CMD_FLAG_NO_HOLE,
        wire::CMD_WRITE_ZEROES,
        10,
        0,
        4096,
    ));
    bytes.extend(req(
        wire::CMD_FLAG_REQ_ONE,
        wire::CMD_BLOCK_STATUS,
        11,
        0,
        4096,
    ));
    bytes.extend(req(0, wire::CMD_TRIM, 12, 512, 512));
    bytes.extend(req(0, wire::CMD_CACHE, 13, 0, 100));
    let commands: Vec<Command> = parse(&n, &bytes)
        .into_iter()
        .map(|e| match e {
            ParseEvent::Request(Request { command, .. }) => command,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        commands,
        vec![
            Command::Read {
                len: 512,
                dont_fragment: true
            },
            Command::Write {
                data: Bytes::from_static(b"abc"),
                fua: true
            },
            Command::Flush,
            Command::WriteZeroes {
                len: 4096,
                may_unmap: false,
                fast_only: false,
                fua: false
            },
            Command::BlockStatus {
                len: 4096,
                req_one: true
            },
            Command::Trim {
                len: 512,
                fua: false
            },
            Command::Cache { len: 100 },
        ]
    );
}

#[test]
fn requests_split_across_reads_are_reassembled() {
    let n = negotiated(ReplyMode::Simple, false, false);
    let mut bytes = req(0, wire::CMD_WRITE, 1, 0, 1000);
    bytes.extend(vec![0x5a; 1000]);
    let mut p = RequestParser::new(&n, no_leftover());
    for piece in bytes.chunks(7) {
        assert_eq!(p.poll(), None);
        p.receive(piece);
    }
    match p.poll() {
        Some(ParseEvent::Request(r)) => assert_eq!(r.payload_bytes(), 1000),
        other => panic!("{other:?}"),
    }
    assert_eq!(p.buffered(), 0);
}

#[test]
fn out_of_range_errors_follow_the_spec() {
    let n = negotiated(ReplyMode::Structured, false, true);
    let end = VOL_SIZE;
    let mut write = req(0, wire::CMD_WRITE, 2, end - 1, 2);
    write.extend([1, 2]);
    let cases: Vec<(Vec<u8>, u32)> = vec![
        (req(0, wire::CMD_READ, 1, end - 1, 2), wire::EINVAL),
        (write, wire::ENOSPC),
        (req(0, wire::CMD_WRITE_ZEROES, 3, end, 1), wire::ENOSPC),
        (req(0, wire::CMD_TRIM, 4, end, 1), wire::EINVAL),
        (req(0, wire::CMD_CACHE, 5, end + 1, 0), wire::EINVAL),
        (req(0, wire::CMD_BLOCK_STATUS, 6, end, 1), wire::EINVAL),
        (req(0, wire::CMD_READ, 7, u64::MAX, u32::MAX), wire::EINVAL),
    ];
    for (bytes, errno) in cases {
        let events = parse(&n, &bytes);
        assert_eq!(events.len(), 1);
        assert_eq!(errno_of(&events[0]), errno, "{bytes:?}");
    }
    // The last byte is fine, and so is a zero-length read at the very end.
    for bytes in [
        req(0, wire::CMD_READ, 8, end - 1, 1),
        req(0, wire::CMD_READ, 9, end, 0),
    ] {
        assert!(matches!(parse(&n, &bytes)[0], ParseEvent::Request(_)));
    }
}

#[test]
fn flags_not_valid_for_the_command_are_einval() {
    let simple = negotiated(ReplyMode::Simple, false, false);
    let structured = negotiated(ReplyMode::Structured, false, true);
    let cases = [
        (&simple, req(wire::CMD_FLAG_DF, wire::CMD_READ, 1, 0, 1)),
        (
            &structured,
            req(wire::CMD_FLAG_REQ_ONE, wire::CMD_READ, 2, 0, 1),
        ),
        (
            &structured,
            req(wire::CMD_FLAG_NO_HOLE, wire::CMD_TRIM, 3, 0, 1),
        ),
        (
            &structured,
            req(wire::CMD_FLAG_FAST_ZERO, wire::CMD_CACHE, 4, 0, 1),
        ),
        (&structured, req(1 << 15, wire::CMD_FLUSH, 5, 0, 0)),
        (
            &structured,
            req(wire::CMD_FLAG_DF, wire::CMD_BLOCK_STATUS, 6, 0, 1),
        ),
        // PAYLOAD_LEN only exists with extended headers.
        (
            &structured,
            req(wire::CMD_FLAG_PAYLOAD_LEN, wire::CMD_READ, 7, 0, 1),
        ),
    ];
    for (n, bytes) in cases {
        let events = parse(n, &bytes);
        assert_eq!(errno_of(&events[0]), wire::EINVAL, "{bytes:?}");
    }
}

#[test]
fn unknown_commands_are_einval_and_parsing_goes_on() {
    let n = negotiated(ReplyMode::Simple, false, false);
    let mut bytes = req(0, 99, 1, 0, 0);
    bytes.extend(req(0, wire::CMD_READ, 2, 0, 1));
    let events = parse(&n, &bytes);
    assert_eq!(errno_of(&events[0]), wire::EINVAL);
    assert!(matches!(events[1], ParseEvent::Request(_)));
}

#[test]
fn writes_on_read_only_export_are_eperm_and_payload_is_consumed() {
    let n = negotiated(ReplyMode::Simple, true, false);
    let mut bytes = req(0, wire::CMD_WRITE, 1, 0, 4);
    bytes.extend([9; 4]);
    bytes.extend(req(0, wire::CMD_TRIM, 2, 0, 4));
    bytes.extend(req(0, wire::CMD_WRITE_ZEROES, 3, 0, 4));
    bytes.extend(req(0, wire::CMD_READ, 4, 0, 4));
    let events = parse(&n, &bytes);
    assert_eq!(events.len(), 4);
    for e in &events[..3] {
        assert_eq!(errno_of(e), wire::EPERM);
    }
    assert!(matches!(events[3], ParseEvent::Request(_)));
}

#[test]
fn oversized_payloads_disconnect_without_buffering() {
    let n = negotiated(ReplyMode::Simple, false, false);
    let mut p = RequestParser::new(&n, no_leftover());
    p.receive(&req(0, wire::CMD_WRITE, 1, 0, MAX_PAYLOAD + 1));
    assert_eq!(
        p.poll(),
        Some(ParseEvent::Violation(Violation::PayloadTooLarge(
            u64::from(MAX_PAYLOAD) + 1
        )))
    );
    p.receive(&[0; 4096]);
    assert_eq!(p.poll(), None);
    assert_eq!(p.buffered(), 0, "nothing is kept after a violation");

    let ext = negotiated(ReplyMode::Extended, false, false);
    let events = parse(&ext, &ext_req(0, wire::CMD_WRITE, 1, 0, 1 << 40));
    assert_eq!(
        events,
        vec![ParseEvent::Violation(Violation::PayloadTooLarge(1 << 40))]
    );
}

#[test]
fn reads_longer_than_the_maximum_block_size_are_einval() {
    let n = negotiated(ReplyMode::Extended, false, false);
    let events = parse(
        &n,
        &ext_req(0, wire::CMD_READ, 1, 0, u64::from(MAX_PAYLOAD) + 1),
    );
    // The export is only 1 MiB, so the range check answers first; either way EINVAL.
    assert_eq!(errno_of(&events[0]), wire::EINVAL);
}

#[test]
fn block_status_needs_a_context_and_a_length() {
    let without = negotiated(ReplyMode::Structured, false, false);
    let events = parse(&without, &req(0, wire::CMD_BLOCK_STATUS, 1, 0, 512));
    assert_eq!(errno_of(&events[0]), wire::EINVAL);
    let with = negotiated(ReplyMode::Structured, false, true);
    let events = parse(&with, &req(0, wire::CMD_BLOCK_STATUS, 2, 0, 0));
    assert_eq!(errno_of(&events[0]), wire::EINVAL);
}

#[test]
fn disconnect_ends_parsing() {
    let n = negotiated(ReplyMode::Simple, false, false);
    let mut bytes = req(0, wire::CMD_DISC, 1, 0, 0);
    bytes.extend(req(0, wire::CMD_READ, 2, 0, 1));
    assert_eq!(parse(&n, &bytes), vec![ParseEvent::Disconnect]);
}

#[test]
fn bad_magic_is_a_violation() {
    let n = negotiated(ReplyMode::Simple, false, false);
    let events = parse(&n, &[0xaa; 28]);
    assert_eq!(
        events,
        vec![ParseEvent::Violation(Violation::BadMagic(0xaaaa_aaaa))]
    );
    // A compact header after extended headers were negotiated is also a bad magic.
    let ext = negotiated(ReplyMode::Extended, false, false);
    let mut bytes = req(0, wire::CMD_READ, 1, 0, 1);
    bytes.extend([0; 4]);
    assert!(matches!(
        parse(&ext, &bytes)[0],
        ParseEvent::Violation(Violation::BadMagic(_))
    ));
}

#[test]
fn extended_payload_on_other_commands_is_drained_and_refused() {
    let n = negotiated(ReplyMode::Extended, false, true);
    let mut bytes = ext_req(wire::CMD_FLAG_PAYLOAD_LEN, wire::CMD_BLOCK_STATUS, 1, 0, 12);
    bytes.extend([0; 12]);
    bytes.extend(ext_req(
        wire::CMD_FLAG_PAYLOAD_LEN,
        wire::CMD_WRITE,
        2,
        0,
        2,
    ));
    bytes.extend([1, 2]);
    bytes.extend(ext_req(0, wire::CMD_BLOCK_STATUS, 3, 0, VOL_SIZE));
    let events = parse(&n, &bytes);
    assert_eq!(events.len(), 3);
    assert_eq!(errno_of(&events[0]), wire::EINVAL);
    assert!(matches!(&events[1], ParseEvent::Request(r) if r.payload_bytes() == 2));
    assert!(matches!(
        &events[2],
        ParseEvent::Request(Request { command: Command::BlockStatus { len, .. }, .. }) if *len == VOL_SIZE
    ));
}

#[test]
fn simple_replies() {
    let enc = ReplyEncoder::new(ReplyMode::Simple);
    let ok = enc.ok(0x1122, 0).to_vec();
    assert_eq!(ok.len(), 16);
    assert_eq!(ok[..4], wire::SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(ok[4..8], [0; 4]);
    assert_eq!(ok[8..], 0x1122u64.to_be_bytes());
    let err = enc.error(5, 0, wire::EPERM, "no").to_vec();
    assert_eq!(err[4..8], wire::EPERM.to_be_bytes());
    assert_eq!(err.len(), 16, "simple errors carry no message");
    let read = enc
        .read(
            1,
            0,
            6,
            vec![
                ReadSegment::Data(Bytes::from_static(b"ab")),
                ReadSegment::Zero(4),
            ],
            false,
        )
        .unwrap()
        .to_vec();
    assert_eq!(&read[16..], b"ab\0\0\0\0");
}

#[test]
fn structured_read_uses_data_and_hole_chunks() {
    let enc = ReplyEncoder::new(ReplyMode::Structured);
    let segments = vec![
        ReadSegment::Data(Bytes::from_static(b"abcd")),
        ReadSegment::Zero(8),
        ReadSegment::Zero(0),
        ReadSegment::Zero(4),
        ReadSegment::Data(Bytes::from_static(b"ef")),
    ];
    let frame = enc
        .read(42, 100, 18, segments.clone(), false)
        .unwrap()
        .to_vec();
    let c = chunks(&frame);
    assert_eq!(c.len(), 3);
    assert_eq!(
        (c[0].ty, c[0].flags, c[0].cookie),
        (wire::REPLY_TYPE_OFFSET_DATA, 0, 42)
    );
    assert_eq!(c[0].payload[..8], 100u64.to_be_bytes());
    assert_eq!(&c[0].payload[8..], b"abcd");
    assert_eq!((c[1].ty, c[1].flags), (wire::REPLY_TYPE_OFFSET_HOLE, 0));
    assert_eq!(c[1].payload[..8], 104u64.to_be_bytes());
    assert_eq!(
        c[1].payload[8..],
        12u32.to_be_bytes(),
        "adjacent zero runs merge"
    );
    assert_eq!(
        (c[2].ty, c[2].flags),
        (wire::REPLY_TYPE_OFFSET_DATA, wire::REPLY_FLAG_DONE)
    );
    assert_eq!(c[2].payload[..8], 116u64.to_be_bytes());

    // Don't fragment: one data chunk with the zeros written out.
    let frame = enc.read(42, 100, 18, segments, true).unwrap().to_vec();
    let c = chunks(&frame);
    assert_eq!(c.len(), 1);
    assert_eq!(
        (c[0].ty, c[0].flags),
        (wire::REPLY_TYPE_OFFSET_DATA, wire::REPLY_FLAG_DONE)
    );
    let mut expected = 100u64.to_be_bytes().to_vec();
    expected.extend(b"abcd");
    expected.extend([0; 12]);
    expected.extend(b"ef");
    assert_eq!(c[0].payload, expected);

    // A zero-length read is a lone NONE chunk.
    let c = chunks(&enc.read(1, 0, 0, vec![], false).unwrap().to_vec());
    assert_eq!(
        (c[0].ty, c[0].flags),
        (wire::REPLY_TYPE_NONE, wire::REPLY_FLAG_DONE)
    );
}

#[test]
fn extended_replies_carry_offset_and_64_bit_length() {
    let enc = ReplyEncoder::new(ReplyMode::Extended);
    let c = chunks(&enc.ok(3, 4096).to_vec());
    assert_eq!(c[0].offset, Some(4096));
    assert_eq!(
        (c[0].ty, c[0].flags),
        (wire::REPLY_TYPE_NONE, wire::REPLY_FLAG_DONE)
    );
    let c = chunks(
        &enc.read(3, 4096, 4, vec![ReadSegment::Zero(4)], false)
            .unwrap()
            .to_vec(),
    );
    assert_eq!(c[0].ty, wire::REPLY_TYPE_OFFSET_HOLE);
    assert_eq!(c[0].payload.len(), 12);
    let c = chunks(&enc.error(3, 4096, wire::EIO, "broken").to_vec());
    assert_eq!(c[0].ty, wire::REPLY_TYPE_ERROR);
    assert_eq!(c[0].payload[..4], wire::EIO.to_be_bytes());
    assert_eq!(c[0].payload[4..6], 6u16.to_be_bytes());
    assert_eq!(&c[0].payload[6..], b"broken");
}

#[test]
fn read_segments_must_add_up() {
    let enc = ReplyEncoder::new(ReplyMode::Structured);
    assert_eq!(
        enc.read(1, 0, 10, vec![ReadSegment::Zero(4)], false)
            .unwrap_err(),
        ReplyError::SegmentLengths {
            expected: 10,
            actual: 4
        }
    );
    assert!(
        enc.read(
            1,
            0,
            1,
            vec![ReadSegment::Zero(u64::MAX), ReadSegment::Zero(2)],
            false
        )
        .is_err()
    );
}

#[test]
fn extents_are_clipped_merged_and_never_empty() {
    let e = |length, flags| Extent { length, flags };
    // Beyond the request, zero-length, repeated flags, unknown bits.
    let raw = [
        e(0, 0),
        e(100, 0),
        e(50, 1 << 7),
        e(200, STATE_HOLE),
        e(900, 0),
    ];
    assert_eq!(
        clip_extents(300, &raw, false),
        vec![e(150, 0), e(150, STATE_HOLE)]
    );
    assert_eq!(clip_extents(120, &raw, true), vec![e(120, 0)]);
    assert_eq!(clip_extents(10, &raw, true), vec![e(10, 0)]);
    assert!(clip_extents(10, &[e(0, 0)], false).is_empty());
    assert_eq!(
        clip_extents(10, &[e(5, STATE_HOLE | STATE_ZERO)], false),
        vec![e(5, STATE_HOLE | STATE_ZERO)]
    );

    let enc = ReplyEncoder::new(ReplyMode::Structured);
    assert_eq!(
        enc.block_status(1, 0, 10, &[], false).unwrap_err(),
        ReplyError::NoExtents
    );
    let c = chunks(&enc.block_status(1, 0, 300, &raw, false).unwrap().to_vec());
    assert_eq!(
        (c[0].ty, c[0].flags),
        (wire::REPLY_TYPE_BLOCK_STATUS, wire::REPLY_FLAG_DONE)
    );
    let mut expected = wire::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    for (len, flags) in [(150u32, 0u32), (150, STATE_HOLE)] {
        expected.extend(len.to_be_bytes());
        expected.extend(flags.to_be_bytes());
    }
    assert_eq!(c[0].payload, expected);

    let enc = ReplyEncoder::new(ReplyMode::Extended);
    let big = [e(1 << 40, STATE_ZERO)];
    let c = chunks(
        &enc.block_status(1, 0, 1 << 33, &big, true)
            .unwrap()
            .to_vec(),
    );
    assert_eq!(c[0].ty, wire::REPLY_TYPE_BLOCK_STATUS_EXT);
    let mut expected = wire::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    expected.extend(1u32.to_be_bytes());
    expected.extend((1u64 << 33).to_be_bytes());
    expected.extend(u64::from(STATE_ZERO).to_be_bytes());
    assert_eq!(c[0].payload, expected);
}

#[test]
fn error_messages_are_cut_to_the_string_limit() {
    let enc = ReplyEncoder::new(ReplyMode::Structured);
    let long = "é".repeat(3000);
    let c = chunks(&enc.error(1, 0, wire::EIO, &long).to_vec());
    let len = usize::from(u16::from_be_bytes([c[0].payload[4], c[0].payload[5]]));
    assert!(len <= wire::MAX_STRING_LEN);
    assert!(std::str::from_utf8(&c[0].payload[6..]).is_ok());
    // Errno 0 is never sent as an error.
    let c = chunks(&enc.error(1, 0, 0, "").to_vec());
    assert_eq!(c[0].payload[..4], wire::EIO.to_be_bytes());
}

fn request(cookie: u64, offset: u64, command: Command) -> Request {
    Request {
        cookie,
        offset,
        command,
    }
}

#[tokio::test]
async fn dispatch_serves_the_export() {
    let export = MemExport::new(VOL_SIZE);
    let enc = ReplyEncoder::new(ReplyMode::Structured);
    let data = Bytes::from(vec![0xab; 8192]);
    let reply = execute(
        &export,
        &enc,
        request(1, 4096, Command::Write { data, fua: false }),
    )
    .await;
    assert_eq!(reply.to_vec()[4..8], [0; 4]);
    assert!(!export.is_durable(4096, 8192));
    execute(&export, &enc, request(2, 0, Command::Flush)).await;
    assert!(export.is_durable(4096, 8192));
    let data = Bytes::from(vec![0xcd; 512]);
    execute(
        &export,
        &enc,
        request(3, 0, Command::Write { data, fua: true }),
    )
    .await;
    assert!(
        export.is_durable(0, 512),
        "FUA write is durable when acknowledged"
    );

    let reply = execute(
        &export,
        &enc,
        request(
            4,
            0,
            Command::Read {
                len: 16384,
                dont_fragment: false,
            },
        ),
    )
    .await;
    let c = chunks(&reply.to_vec());
    let types: Vec<u16> = c.iter().map(|c| c.ty).collect();
    assert_eq!(
        types,
        vec![
            wire::REPLY_TYPE_OFFSET_DATA,
            wire::REPLY_TYPE_OFFSET_DATA,
            wire::REPLY_TYPE_OFFSET_DATA,
            wire::REPLY_TYPE_OFFSET_HOLE
        ]
    );

    execute(
        &export,
        &enc,
        request(
            5,
            4096,
            Command::Trim {
                len: 4096,
                fua: false,
            },
        ),
    )
    .await;
    let reply = execute(
        &export,
        &enc,
        request(
            6,
            0,
            Command::BlockStatus {
                len: 16384,
                req_one: false,
            },
        ),
    )
    .await;
    let c = chunks(&reply.to_vec());
    let mut expected = wire::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    for (len, flags) in [(4096u32, 0u32), (4096, 3), (4096, 0), (4096, 3)] {
        expected.extend(len.to_be_bytes());
        expected.extend(flags.to_be_bytes());
    }
    assert_eq!(c[0].payload, expected);
}

#[tokio::test]
async fn dispatch_maps_export_errors() {
    let export = MemExport::new(VOL_SIZE);
    export.set_failing(true);
    let enc = ReplyEncoder::new(ReplyMode::Simple);
    let reply = execute(
        &export,
        &enc,
        request(
            1,
            0,
            Command::Read {
                len: 10,
                dont_fragment: false,
            },
        ),
    )
    .await
    .to_vec();
    assert_eq!(reply.len(), 16, "no data after a simple error");
    assert_eq!(reply[4..8], wire::EIO.to_be_bytes());
    // Zero-length writes never reach the export.
    let reply = execute(
        &export,
        &enc,
        request(
            2,
            0,
            Command::Write {
                data: Bytes::new(),
                fua: false,
            },
        ),
    )
    .await
    .to_vec();
    assert_eq!(reply[4..8], [0; 4]);
    assert_eq!(errno_for(&ExportError::NotSupported, true), wire::ENOTSUP);
    assert_eq!(errno_for(&ExportError::NotSupported, false), wire::EINVAL);
    assert_eq!(errno_for(&ExportError::NoSpace, false), wire::ENOSPC);
    assert_eq!(errno_for(&ExportError::ReadOnly, false), wire::EPERM);
}
