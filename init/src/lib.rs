//! keel-init: the library behind Keel's PID 1 and `keelctl`.
//!
//! The config schema (`config`) is the appliance's contract: both PID 1 and
//! `keel-image` (which validates before it builds) use it.

pub mod config;
pub mod net;
pub mod storage;
pub mod update;
