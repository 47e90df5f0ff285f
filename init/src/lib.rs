//! keel-init: the library behind Keel's PID 1 and `keelctl`.
//!
//! The config schema (`config`) is the appliance's contract: both PID 1 and
//! `keel-image` (which validates before it builds) use it. The rest is PID 1,
//! one module per concern, driven by `pid1`.

pub mod api;
pub use keel_config as config;
pub mod guest;
pub mod host;
pub mod layout;
pub mod logging;
pub mod modules;
pub mod mounts;
pub mod net;
pub mod outcome;
pub mod partitions;
pub mod pid1;
pub mod power;
pub mod storage;
pub mod update;
