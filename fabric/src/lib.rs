//! What every ClusterLink component shares about the fabric: identity and mTLS
//! configuration (`identity`), the site TLS between one peer's own
//! components (`site`), access tokens (`token`), name and address rules with
//! Kubernetes semantics (`names`), the names on the wire (`wire`), the admin HTTP
//! server both planes use (`admin`), clocks and two concurrency helpers, and, behind
//! the `certs` feature, the certificate profiles the CLI and the operator issue.
//! It holds no policy, no Kubernetes code and nothing of the data path's relay, so
//! that the data plane, the control plane and the CLI can all link it.

pub mod admin;
#[cfg(feature = "certs")]
pub mod certs;
pub mod clock;
pub mod identity;
pub mod names;
pub mod site;
pub mod sync;
pub mod token;
pub mod wire;
