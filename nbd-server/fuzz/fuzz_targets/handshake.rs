//! Fuzzes the handshake core: arbitrary client bytes, fed in pieces whose sizes come from
//! the input itself; whatever negotiation reaches transmission continues into the request
//! parser. Checks the documented buffer bounds on every step.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use trireme_nbd::config::{MAX_OPTION_LEN, MAX_PAYLOAD};
use trireme_nbd::handshake::{Handshake, HandshakeEvent, TlsPolicy};
use trireme_nbd::request::RequestParser;
use trireme_nbd::testing::{MemCatalog, MemExport};

fuzz_target!(|data: &[u8]| {
    let Some((&control, mut rest)) = data.split_first() else {
        return;
    };
    let policy = match control % 3 {
        0 => TlsPolicy::Disabled,
        1 => TlsPolicy::Optional,
        _ => TlsPolicy::Required,
    };
    let chunk = 1 + usize::from(control >> 2) * 16;
    let catalog = MemCatalog::new()
        .with("vol", "fuzz volume", Arc::new(MemExport::new(1 << 20)))
        .with("ro", "", Arc::new(MemExport::new(4096).read_only()));
    let mut handshake = Handshake::new(policy);
    let _ = handshake.take_output();
    let option_bound = 16 + usize::try_from(MAX_OPTION_LEN).unwrap_or(usize::MAX) + chunk;
    while !rest.is_empty() {
        let n = chunk.min(rest.len());
        handshake.receive(&rest[..n]);
        rest = &rest[n..];
        loop {
            let event = handshake.poll(&catalog);
            let _ = handshake.take_output();
            assert!(handshake.buffered() <= option_bound);
            match event {
                HandshakeEvent::Continue => {}
                HandshakeEvent::NeedInput => break,
                HandshakeEvent::StartTls => handshake.tls_established(),
                HandshakeEvent::Close(_) => return,
                HandshakeEvent::Transmission {
                    negotiated,
                    leftover,
                } => {
                    let mut parser = RequestParser::new(&negotiated, leftover);
                    let bound = 32 + usize::try_from(MAX_PAYLOAD).unwrap_or(usize::MAX) + chunk;
                    loop {
                        while parser.poll().is_some() {}
                        assert!(parser.buffered() <= bound);
                        if rest.is_empty() {
                            return;
                        }
                        let n = chunk.min(rest.len());
                        parser.receive(&rest[..n]);
                        rest = &rest[n..];
                    }
                }
            }
        }
    }
});
