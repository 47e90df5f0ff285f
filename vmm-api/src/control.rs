//! The per-VM control socket's messages (`keel-vmm --api-socket PATH`): how a
//! supervisor pauses, resumes, stops and measures one running VM.
//!
//! # Protocol
//!
//! A unix stream socket; each request is one line of JSON, answered by one line of
//! JSON, any number per connection:
//!
//! | request | effect | answer |
//! |---|---|---|
//! | `{"op":"ping"}` | none (the VM is built and running) | `{"ok":true}` |
//! | `{"op":"pause"}` | every vCPU leaves the guest and waits | `{"ok":true}` once all are parked |
//! | `{"op":"resume"}` | the vCPUs go back into the guest | `{"ok":true}` |
//! | `{"op":"power-button"}` | a graceful stop: the ACPI power button when the guest's OS listens to it, else Ctrl-Alt-Del; the guest ending in any way now counts as stopped | `{"ok":true}` |
//! | `{"op":"ctrl-alt-del"}` | just the key combination (Linux reboots on it) | `{"ok":true}` |
//! | `{"op":"stop"}` | hard stop, now (exit code 4) | `{"ok":true}` |
//! | `{"op":"stats"}` | none | `{"ok":true,"stats":{...}}`, see [`Stats`] |
//!
//! Errors are `{"ok":false,"error":"..."}`. keel-vmm creates the socket mode 0600:
//! only its owner (root, on the appliance) may connect.

use serde::{Deserialize, Serialize};

/// One request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Ping,
    Pause,
    Resume,
    /// Graceful stop: the ACPI power button, else Ctrl-Alt-Del; any end of the guest
    /// now counts as stopped.
    PowerButton,
    /// Just Ctrl-Alt-Del (a Linux guest reboots).
    CtrlAltDel,
    /// Hard stop.
    Stop,
    Stats,
}

impl Request {
    /// The `op` value on the wire, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::PowerButton => "power-button",
            Request::CtrlAltDel => "ctrl-alt-del",
            Request::Stop => "stop",
            Request::Stats => "stats",
        }
    }
}

/// One answer line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
}

impl Response {
    pub fn ok() -> Self {
        Response {
            ok: true,
            error: None,
            stats: None,
        }
    }

    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            stats: None,
        }
    }
}

/// What `stats` reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub paused: bool,
    /// CPU time each vCPU thread has used (guest and VMM time on its behalf).
    pub vcpus: Vec<VcpuStats>,
    /// Resident memory of the whole keel-vmm process (guest RAM it touched included).
    pub rss_bytes: u64,
    pub devices: Vec<DeviceStats>,
}

impl Stats {
    /// CPU time of all vCPUs together.
    pub fn vcpu_seconds(&self) -> f64 {
        self.vcpus.iter().map(|v| v.cpu_seconds).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuStats {
    pub id: u32,
    pub cpu_seconds: f64,
}

/// Counters of one device. "In" is towards the guest (disk reads, packets the guest
/// receives), "out" is from the guest (disk writes, packets it sends).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStats {
    pub name: String,
    pub kind: DeviceKind,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub ops_in: u64,
    pub ops_out: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Block,
    Net,
    Rng,
    Console,
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Request; 7] = [
        Request::Ping,
        Request::Pause,
        Request::Resume,
        Request::PowerButton,
        Request::CtrlAltDel,
        Request::Stop,
        Request::Stats,
    ];

    #[test]
    fn requests_and_responses_have_a_stable_wire_format() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"power-button"}"#).unwrap(),
            Request::PowerButton
        );
        assert_eq!(
            serde_json::to_string(&Request::CtrlAltDel).unwrap(),
            r#"{"op":"ctrl-alt-del"}"#
        );
        assert_eq!(serde_json::to_string(&Response::ok()).unwrap(), r#"{"ok":true}"#);
        assert_eq!(
            serde_json::to_string(&Response::err("no")).unwrap(),
            r#"{"ok":false,"error":"no"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
    }

    #[test]
    fn name_is_the_wire_op() {
        for req in ALL {
            let json = serde_json::to_string(&req).unwrap();
            assert_eq!(json, format!(r#"{{"op":"{}"}}"#, req.name()));
        }
    }

    #[test]
    fn stats_round_trip_with_lowercase_kinds() {
        let stats = Stats {
            paused: true,
            vcpus: vec![
                VcpuStats {
                    id: 0,
                    cpu_seconds: 1.5,
                },
                VcpuStats {
                    id: 1,
                    cpu_seconds: 0.5,
                },
            ],
            rss_bytes: 4096,
            devices: vec![DeviceStats {
                name: "virtio-blk0".into(),
                kind: DeviceKind::Block,
                bytes_in: 512,
                bytes_out: 0,
                ops_in: 1,
                ops_out: 0,
            }],
        };
        let text = serde_json::to_string(&stats).unwrap();
        assert!(text.contains(r#""kind":"block""#), "{text}");
        assert_eq!(serde_json::from_str::<Stats>(&text).unwrap(), stats);
        assert_eq!(stats.vcpu_seconds(), 2.0);
    }
}
