//! cl-dataplane: the ClusterLink gateway. See ARCHITECTURE.md for the picture.
//!
//! Modules, bottom to top; a module uses only modules listed before it (and the
//! `fabric` and `controlplane-api` crates):
//! - `metrics`, `sockopt`, `h2conf`, `workers`: counters, socket options, h2
//!   settings, the worker threads;
//! - `snapshot`: the validated configuration in force; `admission`: who may use the
//!   gateway port and how much;
//! - `copy`: the relay loops and how a relay ends; `drain`: in-flight bookkeeping;
//! - `mux`: our own stream multiplexer; `tunnel`: outbound tunnels and their pool;
//! - `cpclient`: the control plane's gRPC API;
//! - `inbound`: the gateway port; `outbound`: the import listeners;
//! - `admin`: the admin port; `app`: wires it all; `process`: the binary's edge.

pub mod admin;
pub mod admission;
pub mod app;
pub mod copy;
pub mod cpclient;
pub mod drain;
pub mod h2conf;
pub mod inbound;
pub mod metrics;
pub mod mux;
pub mod outbound;
pub mod process;
pub mod snapshot;
pub mod sockopt;
pub mod tunnel;
pub mod workers;

pub use app::{start, Config, Running};
