//! The names on the wire between peers and between our own gateways: ALPN ids,
//! header names, peer request paths. Both planes read them from here so that a
//! rename cannot leave one side behind. Constants only: no parsing, no I/O.

/// ALPN: HTTP/2 (CONNECT streams, spec 4.4).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN: HTTP/1.1 (one CONNECT per TLS connection, ClusterLink's own model).
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// ALPN: our gateways' own stream multiplexer, preferred between them.
pub const ALPN_MUX: &[u8] = b"clusterlink-mux/1";
/// ALPN: the multiplexer with PING/PONG, so that a client can tell a connection that
/// went silent (black-holed) before it trusts a stream to it; preferred over version
/// 1, which gateways still speak with peers that do not offer 2.
pub const ALPN_MUX2: &[u8] = b"clusterlink-mux/2";

/// Header every response of our gateway carries, so that a dialer can tell our
/// refusals (authoritative) from a peer that cannot tunnel over h2; heartbeats record
/// it too.
pub const PROTOCOLS_HEADER: &str = "clusterlink-tunnel-protocols";
pub const PROTOCOLS_VALUE: &str = "h2, http/1.1";

/// `GET /healthz`: a peer's heartbeat; the answer carries its labels.
pub const HEALTHZ_PATH: &str = "/healthz";
/// `POST /authz`: asks the exporting peer for an access token.
pub const AUTHZ_PATH: &str = "/authz";
/// Response header of `/authz` with the access token (ClusterLink's name).
pub const TOKEN_HEADER: &str = "x-access-token";
/// Header on our `/authz` answers with the token's expiry (Unix seconds).
pub const TOKEN_EXPIRES_HEADER: &str = "x-access-token-expires";
/// Response header of `/healthz`: base64 JSON map of the peer's labels (ClusterLink's name).
pub const PEER_LABELS_HEADER: &str = "ClusterLinkPeerLabels";
