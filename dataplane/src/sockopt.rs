//! Socket options of the gateway's TCP sockets: TCP_NODELAY and keepalive on every
//! tunnel and client socket (set once on listening sockets, which accepted ones
//! inherit), and TCP_USER_TIMEOUT on pooled tunnel connections only. It never reads or
//! writes a socket.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// On a pooled (mux or h2) tunnel connection, data sent and not acknowledged for this
/// long, or keepalive probes unanswered for this long after the last data received,
/// end the connection (TCP_USER_TIMEOUT). Without it, a peer that vanished without a
/// reset (a dead VM, a load balancer that dropped its state) kept a pooled connection,
/// and the streams on it, for the kernel's retransmission limit, about 15 minutes; with
/// keepalive alone, 2 minutes when idle. Only there: Linux also ends a connection whose
/// receive window stays closed this long, even while the peer answers the probes, and
/// only the multiplexer's and h2's readers never stop reading. A local client or
/// target, or an HTTP/1.1 tunnel (a plain relay), may rightly stop reading for longer.
pub const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Sets `USER_TIMEOUT` on a pooled tunnel connection (once its ALPN says mux or h2).
pub fn set_user_timeout(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// TCP_NODELAY and keepalive on a tunnel or client socket.
pub fn tune(tcp: &TcpStream) {
    tune_socket(socket2::SockRef::from(tcp));
}

fn tune_socket(sock: socket2::SockRef<'_>) {
    let _ = sock.set_tcp_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    let _ = sock.set_tcp_keepalive(&ka);
}

/// The options of `tune` on a listening socket. On Linux every accepted socket inherits
/// them (TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL), which saves four
/// setsockopt calls per accepted connection; see `tune_accepted`.
pub fn tune_listener(listener: &TcpListener) {
    tune_socket(socket2::SockRef::from(listener));
}

/// `tune` for a socket accepted from a listener that went through `tune_listener`:
/// nothing to do on Linux, where the options were inherited.
pub fn tune_accepted(tcp: &TcpStream) {
    if !cfg!(target_os = "linux") {
        tune(tcp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_carry_the_listener_options() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        tune_listener(&listener);
        let client = TcpStream::connect(listener.local_addr()?).await?;
        let (accepted, _) = listener.accept().await?;
        tune_accepted(&accepted);
        let sock = socket2::SockRef::from(&accepted);
        anyhow::ensure!(accepted.nodelay()?, "TCP_NODELAY not set");
        anyhow::ensure!(sock.keepalive()?, "SO_KEEPALIVE not set");
        anyhow::ensure!(sock.tcp_keepalive_time()? == Duration::from_secs(30));
        anyhow::ensure!(sock.tcp_keepalive_interval()? == Duration::from_secs(10));
        anyhow::ensure!(
            sock.tcp_user_timeout()?.is_none(),
            "TCP_USER_TIMEOUT on a socket that may rightly stall"
        );
        drop(client);
        Ok(())
    }
}
