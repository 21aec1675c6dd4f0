//! cl-controlplane: turns ClusterLink resources into what the gateways enforce.
//! See ARCHITECTURE.md.

pub mod app;
pub mod authz;
pub mod core;
pub mod heartbeat;
pub mod k8s;
pub mod lb;
pub mod pdp;
pub mod peerclient;
pub mod pods;
pub mod process;
pub mod resources;
pub mod selector;
pub mod server;
pub mod store;

pub use app::{start, Config, Running};
