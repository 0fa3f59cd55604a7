//! The blocking client against the real server over TCP.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::client::{Client, ClientError};
use crate::config::ServerConfig;
use crate::server::serve_tcp;
use crate::shutdown::Shutdown;
use crate::testing::{MemCatalog, MemExport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_writes_reads_maps_and_flushes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let vol = Arc::new(MemExport::new(128 << 20));
    let cat = Arc::new(MemCatalog::new().with("vol", "", vol.clone()));
    let shutdown = Shutdown::new();
    let task = tokio::spawn(serve_tcp(
        listener,
        cat,
        Arc::new(ServerConfig::default()),
        shutdown.clone(),
    ));
    let vol2 = vol.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = Client::connect_tcp(addr, "vol").unwrap();
        assert!(!c.read_only());
        let total = c.size();
        // Many pipelined writes, one larger than the protocol's payload limit.
        for i in 0..40u64 {
            c.write(i * 8192, &[u8::try_from(i).unwrap(); 4096])
                .unwrap();
        }
        assert!(
            total >= (40 << 20) + (33 << 20),
            "VOL_SIZE too small for this test"
        );
        c.write(40 << 20, &vec![0x5a; 33 << 20]).unwrap();
        c.write_zeroes(8192, 4096).unwrap();
        c.flush().unwrap();
        let mut buf = vec![0u8; 8192];
        c.read(0, &mut buf).unwrap();
        assert_eq!(&buf[..4096], &[0u8; 4096][..]);
        c.read(16384, &mut buf).unwrap();
        assert_eq!(&buf[..4096], &[2u8; 4096][..]);
        assert_eq!(&buf[4096..], &[0u8; 4096][..]);
        assert_eq!(vol2.contents(3 * 8192, 4096), vec![3u8; 4096]);
        assert_eq!(vol2.contents((73 << 20) - 4096, 4096), vec![0x5a; 4096]);
        let runs = c
            .block_status(0, 1 << 20)
            .unwrap()
            .expect("base:allocation");
        assert!(runs.iter().map(|r| r.length).sum::<u64>() > 0);
        // Past the end: the server's error comes back, named.
        let err = c
            .write(total, &[1; 4096])
            .and_then(|()| c.flush())
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Command {
                    command: "WRITE",
                    ..
                }
            ),
            "{err}"
        );
        c.disconnect().unwrap();
        let unknown = Client::connect_tcp(addr, "nope").unwrap_err();
        assert!(unknown.to_string().contains("no such export"), "{unknown}");
    })
    .await
    .unwrap();
    shutdown.trigger();
    task.await.unwrap().unwrap();
}
