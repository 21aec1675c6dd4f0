//! ClusterLink's Kubernetes deployment. `manifests` builds the objects of one
//! deployment from an `Instance` spec (spec §1.3, §6.2, §6.3): the Secrets, the
//! control plane and data plane Deployments with their ServiceAccounts and RBAC, the
//! control plane Service and the gateway Service. `clusterlink deploy peer
//! --platform k8s --start none` renders them into `k8s.yaml`; `controller` (the
//! `cl-operator` binary) reconciles an `Instance` into the same objects, so the two
//! install paths cannot drift.

pub mod controller;
pub mod manifests;
