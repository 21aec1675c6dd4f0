//! cl-dataplane: the ClusterLink gateway. See ARCHITECTURE.md for the picture.

pub mod admin;
pub mod app;
pub mod copy;
pub mod cpclient;
pub mod inbound;
pub mod metrics;
pub mod mux;
pub mod outbound;
pub mod process;
pub mod snapshot;
pub mod tls;
pub mod token;
pub mod tunnel;
pub mod workers;

pub use app::{start, Config, Running};
