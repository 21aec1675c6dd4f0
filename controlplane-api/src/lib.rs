//! Generated code for the control plane <-> data plane API (`proto/dataplane.proto`).
//! Nothing else belongs here.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("clusterlink.dataplane.v1");
}
