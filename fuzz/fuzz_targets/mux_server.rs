//! The `clusterlink-mux/1` server, fed arbitrary bytes as a remote gateway over an
//! in-memory duplex: frames decoded and dispatched (OPENs answered: "Bearer ok" is
//! accepted, held briefly and reset, anything else refused), no panic, and the
//! connection always ends (virtual time, so every deadline inside fires at once).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let on_open = |incoming: dataplane::mux::Incoming| {
            tokio::spawn(async move {
                if incoming.authorization() != Some("Bearer ok") {
                    return incoming.refuse(403, "no").await;
                }
                // Established, held a moment (frames for it arrive meanwhile),
                // then dropped: reset.
                if let Ok(stream) = incoming.accept().await {
                    tokio::task::yield_now().await;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    drop(stream);
                }
            });
        };
        let server = tokio::spawn(dataplane::mux::serve(server, on_open, stop, None));
        let input = data.to_vec();
        let feed = async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(60), feed).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(60), server).await;
    });
});
