//! The HTTP/2 settings of our tunnels, one place for both ends: the pooled client
//! connections (`crate::tunnel`) and the gateway port (`crate::inbound`). Only
//! settings; it never touches a connection.

/// HTTP/2 flow-control windows: large enough that flow control never stalls a bulk
/// transfer on loopback (ztunnel uses the same 4 MiB / 16 MiB).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONN_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 256 * 1024;
/// Most DATA bytes h2 buffers per stream before the stream must wait for the socket.
/// 1 MiB before: with 8 streams that kept up to 8 MiB of read data in flight per
/// gateway, far beyond the caches (benches/README.md: 8 streams 5.64 -> 6.09 Gbit/s,
/// medians of 6 alternating runs, within the noise; 1 stream unchanged). It also
/// bounds what a stream holds for a slow remote.
pub const SEND_BUFFER: usize = 256 * 1024;

/// Streams one h2 connection may carry at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// The client side of a pooled h2 tunnel connection.
pub fn client() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .enable_push(false);
    b
}

/// The gateway port's side of an h2 connection (the caller bounds the request head).
pub fn server() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    b
}
