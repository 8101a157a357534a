//! cochat: the process and its adapters. `run(settings, listener)` starts the real server on a
//! listener the caller bound, so integration tests start exactly what production runs.

pub mod store;
