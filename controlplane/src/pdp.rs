//! PDP (being written).
