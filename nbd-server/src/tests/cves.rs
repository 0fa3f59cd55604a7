//! One test per class of bug found in other NBD servers: overlong names, huge option
//! lengths, messages out of order, and STARTTLS command injection.

use std::sync::Arc;

use super::support::*;
use crate::config::MAX_OPTION_LEN;
use crate::handshake::{CloseReason, Handshake, HandshakeEvent, TlsPolicy};
use crate::request::{ParseEvent, RequestParser, Violation};
use crate::testing::{MemCatalog, MemExport};
use crate::wire;

fn long_name_catalog() -> (MemCatalog, String) {
    let name = "n".repeat(wire::MAX_STRING_LEN);
    let catalog = MemCatalog::new().with(&name, "", Arc::new(MemExport::new(4096)));
    (catalog, name)
}

#[test]
fn export_names_up_to_4096_bytes_work_and_longer_ones_are_refused() {
    let (cat, name) = long_name_catalog();
    let mut hs = started(TlsPolicy::Disabled, &cat);
    let (out, event) = drive(
        &mut hs,
        &cat,
        &opt(wire::OPT_GO, &go_data(name.as_bytes(), &[])),
    );
    assert_eq!(replies(&out).last().unwrap().ty, wire::REP_ACK);
    assert!(matches!(event, HandshakeEvent::Transmission { .. }));

    let mut hs = started(TlsPolicy::Disabled, &cat);
    for len in [4097usize, 60_000] {
        let long = vec![b'n'; len];
        let (out, event) = drive(&mut hs, &cat, &opt(wire::OPT_GO, &go_data(&long, &[])));
        assert_eq!(replies(&out)[0].ty, wire::REP_ERR_INVALID);
        assert!(matches!(event, HandshakeEvent::NeedInput));
        let (out, _) = drive(&mut hs, &cat, &opt(wire::OPT_INFO, &go_data(&long, &[])));
        assert_eq!(replies(&out)[0].ty, wire::REP_ERR_INVALID);
        let query = "base:".to_owned() + &"a".repeat(len);
        let (out, _) = drive(
            &mut hs,
            &cat,
            &opt(wire::OPT_LIST_META_CONTEXT, &meta_data("x", &[&query])),
        );
        assert_eq!(replies(&out)[0].ty, wire::REP_ERR_INVALID);
    }

    let mut hs = started(TlsPolicy::Disabled, &cat);
    let (_, event) = drive(&mut hs, &cat, &opt(wire::OPT_EXPORT_NAME, name.as_bytes()));
    assert!(matches!(event, HandshakeEvent::Transmission { .. }));
    let mut hs = started(TlsPolicy::Disabled, &cat);
    let (out, event) = drive(&mut hs, &cat, &opt(wire::OPT_EXPORT_NAME, &[b'n'; 4097]));
    assert!(out.is_empty());
    assert!(matches!(
        event,
        HandshakeEvent::Close(CloseReason::ExportNameRefused(_))
    ));
}

#[test]
fn huge_option_lengths_are_refused_and_closed_without_reading_them() {
    let (cat, _) = catalog();
    // Just over the limit, and 0xffffffff: refused with TOO_BIG at the header, before
    // any of the data is read, and the connection closes; nothing is buffered.
    for len in [MAX_OPTION_LEN + 1, u32::MAX] {
        let mut hs = started(TlsPolicy::Disabled, &*cat);
        let mut header = opt(wire::OPT_LIST, &[]);
        header[12..16].copy_from_slice(&len.to_be_bytes());
        let (out, event) = drive(&mut hs, &*cat, &header);
        let r = replies(&out);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].ty, wire::REP_ERR_TOO_BIG);
        assert!(matches!(event, HandshakeEvent::Close(CloseReason::OptionTooLong(l)) if l == len));
        assert_eq!(hs.buffered(), 0);
        // Whatever the client sends next is ignored.
        hs.receive(&vec![0xffu8; 64 * 1024]);
        assert_eq!(hs.buffered(), 0);
    }

    // For EXPORT_NAME there is no way to refuse but closing.
    let mut hs = started(TlsPolicy::Disabled, &*cat);
    let mut header = opt(wire::OPT_EXPORT_NAME, &[]);
    header[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    let (out, event) = drive(&mut hs, &*cat, &header);
    assert!(out.is_empty());
    assert!(matches!(
        event,
        HandshakeEvent::Close(CloseReason::OptionTooLong(_))
    ));
}

#[test]
fn transmission_bytes_during_the_handshake_close_the_connection() {
    let (cat, _) = catalog();
    // A request header where client flags belong: unknown flag bits.
    let mut hs = Handshake::new(TlsPolicy::Disabled);
    hs.take_output();
    let (out, event) = drive(&mut hs, &*cat, &req(0, wire::CMD_READ, 1, 0, 512));
    assert!(out.is_empty());
    assert!(matches!(
        event,
        HandshakeEvent::Close(CloseReason::UnknownClientFlags(_))
    ));
    // A request header where an option belongs: bad option magic, nothing parsed.
    let mut hs = started(TlsPolicy::Disabled, &*cat);
    let (out, event) = drive(&mut hs, &*cat, &req(0, wire::CMD_WRITE, 1, 0, 512));
    assert!(out.is_empty());
    assert!(matches!(
        event,
        HandshakeEvent::Close(CloseReason::BadOptionMagic(_))
    ));
    // Nothing more is done after closing.
    let (out, _) = drive(&mut hs, &*cat, &opt(wire::OPT_LIST, &[]));
    assert!(out.is_empty());
}

#[test]
fn options_after_go_are_a_violation_not_an_option() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Disabled, &*cat);
    let mut input = opt(wire::OPT_GO, &go_data(b"vol", &[]));
    input.extend(opt(wire::OPT_LIST, &[]));
    input.extend(vec![0; 12]);
    let (out, event) = drive(&mut hs, &*cat, &input);
    assert_eq!(
        replies(&out).last().unwrap().ty,
        wire::REP_ACK,
        "only GO is answered"
    );
    let HandshakeEvent::Transmission {
        negotiated,
        leftover,
    } = event
    else {
        panic!("expected transmission")
    };
    let mut parser = RequestParser::new(&negotiated, leftover);
    assert!(matches!(
        parser.poll(),
        Some(ParseEvent::Violation(Violation::BadMagic(_)))
    ));
    assert_eq!(parser.poll(), None);
}

#[test]
fn plaintext_pipelined_after_starttls_is_never_parsed() {
    let (cat, _) = catalog();
    for policy in [TlsPolicy::Required, TlsPolicy::Optional] {
        let mut hs = started(policy, &*cat);
        // STARTTLS with an injected GO and a structured-reply option in the same read.
        let mut input = opt(wire::OPT_STARTTLS, &[]);
        input.extend(opt(wire::OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(wire::OPT_GO, &go_data(b"vol", &[])));
        let (out, event) = drive(&mut hs, &*cat, &input);
        assert!(out.is_empty(), "no reply at all, not even the ACK: {out:?}");
        assert!(matches!(
            event,
            HandshakeEvent::Close(CloseReason::PlaintextAfterStartTls)
        ));
        assert_eq!(hs.buffered(), 0);
    }

    // Bytes that arrive while the TLS handshake is pending are not parsed either.
    let mut hs = started(TlsPolicy::Required, &*cat);
    let (_, event) = drive(&mut hs, &*cat, &opt(wire::OPT_STARTTLS, &[]));
    assert!(matches!(event, HandshakeEvent::StartTls));
    let (out, event) = drive(&mut hs, &*cat, &opt(wire::OPT_GO, &go_data(b"vol", &[])));
    assert!(out.is_empty());
    assert!(matches!(
        event,
        HandshakeEvent::Close(CloseReason::PlaintextAfterStartTls)
    ));
    assert_eq!(hs.buffered(), 0);
}
