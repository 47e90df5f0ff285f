//! What applying a new config would do: the plan `keelctl apply --dry-run` and
//! `keelctl diff` print, computed from the applied config and the new one alone.
//!
//! Guests are compared field by field (through their JSON form, so positions in
//! the file do not count). A guest whose VM would differ (CPUs, memory, kernel,
//! disks, NICs, ...) is restarted if it runs and just updated otherwise; a change
//! only to `autostart` or `restart` never touches the running VM.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Guest};

/// Guest fields whose change does not need the VM restarted.
const LIVE_FIELDS: [&str; 2] = ["autostart", "restart"];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestAction {
    /// New guest with autostart: started.
    Start,
    /// New guest without autostart: declared only.
    Add,
    /// Gone from the config: stopped (if running) and forgotten. Volumes stay.
    Remove,
    /// Changed and running: stopped gracefully, started with the new settings.
    Restart,
    /// Changed, but the running VM is unaffected or the guest is not running.
    Update,
    Unchanged,
}

impl GuestAction {
    pub fn as_str(&self) -> &'static str {
        match self {
            GuestAction::Start => "start",
            GuestAction::Add => "add",
            GuestAction::Remove => "remove",
            GuestAction::Restart => "restart",
            GuestAction::Update => "update",
            GuestAction::Unchanged => "unchanged",
        }
    }
}

/// One changed field: `memory: 256MiB -> 512MiB`. `None` is absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    pub field: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestPlan {
    pub guest: String,
    pub action: GuestAction,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<FieldChange>,
    /// A removed guest's volumes that no guest of the new config uses: Keel keeps
    /// them (`keelctl volume rm` deletes one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_volumes: Vec<String>,
}

/// Changes outside `guests:` (host, network, storage, update), reconciled as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionPlan {
    pub section: String,
    pub changes: Vec<FieldChange>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub guests: Vec<GuestPlan>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sections: Vec<SectionPlan>,
}

impl GuestPlan {
    /// Whether the changes reach the VM itself (not just autostart or restart policy).
    pub fn affects_vm(&self) -> bool {
        self.changes.iter().any(|c| {
            let top = c.field.split(['.', '[']).next().unwrap_or("");
            !LIVE_FIELDS.contains(&top)
        })
    }
}

impl Plan {
    /// Whether applying would change anything.
    pub fn is_noop(&self) -> bool {
        self.sections.is_empty() && self.guests.iter().all(|g| g.action == GuestAction::Unchanged)
    }

    pub fn guest(&self, name: &str) -> Option<&GuestPlan> {
        self.guests.iter().find(|g| g.guest == name)
    }
}

/// The plan from `old` (None: nothing applied yet) to `new`. `is_active(name)` says
/// whether a guest currently has a VMM (or a pending restart).
pub fn compute(old: Option<&Config>, new: &Config, is_active: impl Fn(&str) -> bool) -> Plan {
    let empty: Vec<Guest> = Vec::new();
    let old_guests = old.map(|c| &c.guests).unwrap_or(&empty);
    let mut guests = Vec::new();
    for g in &new.guests {
        let name = g.name.value.clone();
        let plan = match old_guests.iter().find(|o| o.name.value == name) {
            None => GuestPlan {
                action: if g.autostart {
                    GuestAction::Start
                } else {
                    GuestAction::Add
                },
                guest: name,
                changes: Vec::new(),
                kept_volumes: Vec::new(),
            },
            Some(o) => {
                let mut plan = GuestPlan {
                    guest: name,
                    action: GuestAction::Unchanged,
                    changes: diff_values(&to_json(o), &to_json(g)),
                    kept_volumes: Vec::new(),
                };
                if !plan.changes.is_empty() {
                    plan.action = if plan.affects_vm() && is_active(&plan.guest) {
                        GuestAction::Restart
                    } else {
                        GuestAction::Update
                    };
                }
                plan
            }
        };
        guests.push(plan);
    }
    for o in old_guests {
        if !new.guests.iter().any(|g| g.name.value == o.name.value) {
            let still_used =
                |v: &crate::config::PoolPath| new.guests.iter().flat_map(|g| &g.disks).any(|d| d.volume.value == *v);
            guests.push(GuestPlan {
                guest: o.name.value.clone(),
                action: GuestAction::Remove,
                changes: Vec::new(),
                kept_volumes: o
                    .disks
                    .iter()
                    .filter(|d| !still_used(&d.volume.value))
                    .map(|d| d.volume.value.to_string())
                    .collect(),
            });
        }
    }

    let mut sections = Vec::new();
    let old_json = old.map(to_json).unwrap_or(serde_json::Value::Null);
    let new_json = to_json(new);
    for section in ["host", "network", "storage", "update"] {
        let changes = diff_values(
            old_json.get(section).unwrap_or(&serde_json::Value::Null),
            new_json.get(section).unwrap_or(&serde_json::Value::Null),
        );
        if !changes.is_empty() {
            sections.push(SectionPlan {
                section: section.into(),
                changes: changes
                    .into_iter()
                    .map(|c| FieldChange {
                        field: if c.field.is_empty() {
                            section.to_string()
                        } else {
                            format!("{section}.{}", c.field)
                        },
                        ..c
                    })
                    .collect(),
            });
        }
    }
    Plan { guests, sections }
}

fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Field-level differences between two JSON values, with paths like
/// `restart.backoff` and `disks[0].size`.
pub fn diff_values(old: &serde_json::Value, new: &serde_json::Value) -> Vec<FieldChange> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", old, &mut a);
    flatten("", new, &mut b);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| FieldChange {
            field: k.clone(),
            old: a.get(k).cloned(),
            new: b.get(k).cloned(),
        })
        .collect()
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    use serde_json::Value;
    match v {
        Value::Null => {}
        Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        crate::config::parse_str(text).expect("valid").config
    }

    const OLD: &str = "version: 1\nstorage: {pools: [{name: p}]}\nguests:\n  - name: keep\n    memory: 64MiB\n    disks: [{volume: p/shared, size: 1GiB, readonly: true}]\n  - name: grow\n    memory: 64MiB\n  - name: policy\n    memory: 64MiB\n  - name: gone\n    memory: 64MiB\n    disks: [{volume: p/gone-root, size: 1GiB}, {volume: p/shared, size: 1GiB, readonly: true}]\n  - name: idle\n    memory: 64MiB\n";
    const NEW: &str = "version: 1\nhost: {hostname: lab}\nstorage: {pools: [{name: p}]}\nguests:\n  - name: keep\n    memory: 64MiB\n    disks: [{volume: p/shared, size: 1GiB, readonly: true}]\n  - name: grow\n    memory: 128MiB\n    vcpus: 2\n  - name: policy\n    memory: 64MiB\n    restart: {policy: always}\n  - name: idle\n    memory: 32MiB\n  - name: fresh\n    memory: 64MiB\n  - name: later\n    memory: 64MiB\n    autostart: false\n";

    #[test]
    fn plans_every_kind_of_change() {
        let plan = compute(Some(&cfg(OLD)), &cfg(NEW), |name| name != "idle");
        let action = |n: &str| plan.guest(n).map(|g| g.action.clone());
        assert_eq!(action("keep"), Some(GuestAction::Unchanged));
        assert_eq!(action("grow"), Some(GuestAction::Restart));
        assert_eq!(action("policy"), Some(GuestAction::Update));
        assert_eq!(action("idle"), Some(GuestAction::Update), "not running: no restart");
        assert_eq!(action("gone"), Some(GuestAction::Remove));
        assert_eq!(
            plan.guest("gone").map(|g| g.kept_volumes.clone()),
            Some(vec!["p/gone-root".to_string()])
        );
        assert_eq!(action("fresh"), Some(GuestAction::Start));
        assert_eq!(action("later"), Some(GuestAction::Add));
        let grow = &plan.guest("grow").unwrap().changes;
        assert_eq!(
            grow,
            &[
                FieldChange {
                    field: "memory".into(),
                    old: Some("64MiB".into()),
                    new: Some("128MiB".into())
                },
                FieldChange {
                    field: "vcpus".into(),
                    old: Some("1".into()),
                    new: Some("2".into())
                },
            ]
        );
        assert_eq!(plan.sections.len(), 1);
        assert_eq!(plan.sections[0].changes[0].field, "host.hostname");
        assert!(!plan.is_noop());
    }

    #[test]
    fn the_same_config_is_a_noop_whatever_its_layout() {
        let a = cfg(OLD);
        let b = cfg(&OLD.replace("memory: 64MiB", "memory:   64MiB   # same"));
        let plan = compute(Some(&a), &b, |_| true);
        assert!(plan.is_noop(), "{plan:?}");
    }

    #[test]
    fn a_first_apply_starts_everything() {
        let plan = compute(None, &cfg(OLD), |_| false);
        assert!(plan.guests.iter().all(|g| g.action == GuestAction::Start));
    }
}
