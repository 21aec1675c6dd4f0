//! The data plane's snapshot conversion (what every control plane update goes
//! through): any protobuf bytes, no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = controlplane_api::v1::Snapshot::decode(data) else {
        return;
    };
    let metrics = dataplane::metrics::Metrics::new();
    let _ = dataplane::snapshot::Snapshot::from_proto(s, &metrics);
});
