//! The guest wing: everything about one guest's keel-vmm process beyond the
//! supervisor's state machine — its stderr log and relay, and what a VMM that does
//! not move is doing.

pub mod stuck;
pub mod vmm_log;
