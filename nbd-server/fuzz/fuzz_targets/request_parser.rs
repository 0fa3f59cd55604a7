//! Fuzzes the transmission-phase request parser under every negotiated mode; the first
//! input byte picks the mode and export properties, the rest is the client's byte stream.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use trireme_nbd::config::MAX_PAYLOAD;
use trireme_nbd::handshake::{Negotiated, transmission_flags};
use trireme_nbd::reply::ReplyMode;
use trireme_nbd::request::{ParseEvent, RequestParser};
use trireme_nbd::testing::MemExport;
use trireme_nbd::{Export, ExportHandle};

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let mode = match control % 3 {
        0 => ReplyMode::Simple,
        1 => ReplyMode::Structured,
        _ => ReplyMode::Extended,
    };
    let read_only = control & 4 != 0;
    let size = 1u64 << 20;
    let export = MemExport::new(size);
    let export: Arc<dyn Export> = Arc::new(if read_only { export.read_only() } else { export });
    let negotiated = Negotiated {
        transmission_flags: transmission_flags(export.as_ref(), mode),
        export: ExportHandle {
            name: "vol".into(),
            description: String::new(),
            export,
        },
        size,
        read_only,
        mode,
        base_allocation: mode != ReplyMode::Simple && control & 8 != 0,
        block_size_requested: control & 16 != 0,
        tls: false,
    };
    let chunk = 1 + usize::from(control >> 5) * 97;
    let mut parser = RequestParser::new(&negotiated, bytes::BytesMut::new());
    let bound = 32 + usize::try_from(MAX_PAYLOAD).unwrap_or(usize::MAX) + chunk;
    for piece in rest.chunks(chunk) {
        parser.receive(piece);
        while let Some(event) = parser.poll() {
            if let ParseEvent::Request(request) = event {
                // Validation promises: in range, payload bounded.
                let end = request.offset.checked_add(match request.command {
                    trireme_nbd::request::Command::Read { len, .. }
                    | trireme_nbd::request::Command::Trim { len, .. }
                    | trireme_nbd::request::Command::Cache { len }
                    | trireme_nbd::request::Command::WriteZeroes { len, .. }
                    | trireme_nbd::request::Command::BlockStatus { len, .. } => len,
                    trireme_nbd::request::Command::Write { ref data, .. } => {
                        u64::try_from(data.len()).unwrap_or(u64::MAX)
                    }
                    trireme_nbd::request::Command::Flush => 0,
                });
                assert!(end.is_some_and(|end| end <= size));
                assert!(request.payload_bytes() <= u64::from(MAX_PAYLOAD));
            }
        }
        assert!(parser.buffered() <= bound);
    }
});
