//! The resource YAML parser and validator (what `clusterlink apply` and the control
//! plane's directory source run on every file): any text, no panic; every document
//! it accepts also validates or is refused with a reason.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for r in controlplane::resources::parse_documents(text)
        .into_iter()
        .flatten()
    {
        let _ = controlplane::resources::validate(&r);
    }
});
