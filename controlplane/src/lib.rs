//! cl-controlplane: turns ClusterLink resources into what the gateways enforce.
//! See ARCHITECTURE.md.

pub mod lb;
pub mod pdp;
pub mod resources;
pub mod selector;
pub mod store;
