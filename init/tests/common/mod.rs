//! Helpers for the netns and storage integration tests: throw-away network
//! namespaces (always deleted, even when a test fails), running async code
//! inside one, and small `ip`/`nft` wrappers.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Panics with a clear message unless running as root: these tests create
/// network namespaces, bridges and nftables rules, and must not pass silently.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (network namespaces, nftables); run it as root");
    }
    for tool in ["ip", "nft", "busybox"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false)
            || Path::new("/usr/sbin").join(tool).exists()
            || Path::new("/sbin").join(tool).exists();
        if !found {
            panic!("this test needs `{tool}`; run ci/setup (packages iproute2 nftables busybox-static)");
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test process uses: tag + pid + counter.
pub fn unique(tag: &str) -> String {
    format!(
        "keeltest-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace, deleted (with the processes started in it) on drop.
pub struct Netns {
    pub name: String,
    children: std::sync::Mutex<Vec<Child>>,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        run_ok("ip", &["netns", "add", &name]);
        let ns = Netns {
            name,
            children: Default::default(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS`, which must succeed; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run_ok("ip", &a)
    }

    /// Runs a command inside the namespace and returns its output (any status).
    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut a = vec!["netns", "exec", &self.name];
        a.extend_from_slice(cmd);
        Command::new("ip").args(&a).output().expect("run ip netns exec")
    }

    /// Runs a command inside the namespace; it must succeed. Returns stdout.
    pub fn exec_ok(&self, cmd: &[&str]) -> String {
        let out = self.exec(cmd);
        assert!(
            out.status.success(),
            "in {}: {:?} failed: {}\n{}",
            self.name,
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a background process in the namespace; killed on drop.
    pub fn spawn(&self, cmd: &[&str]) {
        let mut a = vec!["netns", "exec", &self.name];
        a.extend_from_slice(cmd);
        let child = Command::new("ip")
            .args(&a)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn in netns");
        self.children.lock().unwrap().push(child);
    }

    /// Runs `f` on a thread that has entered this namespace, on a fresh tokio
    /// runtime; panics inside propagate to the caller.
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                let fd = std::fs::File::open(&path).expect("open netns");
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(f())
            });
            match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    /// `ip -j` output of the namespace, parsed.
    pub fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["-j"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ip(&a)).expect("ip -j output is JSON")
    }

    /// The nftables ruleset as JSON with rule/chain/table handles removed (they
    /// are allocation counters, new on every table replacement) and counter
    /// values removed (a replaced table starts counting from zero).
    pub fn nft_ruleset(&self) -> serde_json::Value {
        let out = self.exec_ok(&["nft", "-j", "list", "ruleset"]);
        let mut v: serde_json::Value = serde_json::from_str(&out).expect("nft -j is JSON");
        strip_keys(&mut v, &["handle", "metainfo", "packets", "bytes"]);
        // Tables list in creation order, and a replaced table is a new one:
        // order entries by table, keeping the order inside each table.
        if let Some(items) = v["nftables"].as_array_mut() {
            items.sort_by_key(|e| {
                let body = e
                    .as_object()
                    .and_then(|o| o.values().next())
                    .cloned()
                    .unwrap_or_default();
                let table = if e.get("table").is_some() {
                    body["name"].clone()
                } else {
                    body["table"].clone()
                };
                format!("{}/{}", body["family"], table)
            });
        }
        v
    }

    /// Text of `nft list table ip keel` (what an operator reads).
    pub fn nft_table_text(&self, family: &str, table: &str) -> String {
        self.exec_ok(&["nft", "list", "table", family, table])
    }

    /// Links as comparable facts: name, kind, master, flags, MAC, MTU.
    pub fn link_state(&self) -> Vec<serde_json::Value> {
        let v = self.ip_json(&["-d", "link", "show"]);
        let mut out: Vec<serde_json::Value> = v
            .as_array()
            .expect("array")
            .iter()
            .map(|l| {
                serde_json::json!({
                    "ifname": l["ifname"],
                    "kind": l["linkinfo"]["info_kind"],
                    "master": l["master"],
                    "flags": l["flags"],
                    "address": l["address"],
                    "mtu": l["mtu"],
                    "vlan": l["linkinfo"]["info_data"]["id"],
                })
            })
            .collect();
        out.sort_by_key(|l| l["ifname"].to_string());
        out
    }

    /// (interface, "addr/prefix") for every IPv4 address.
    pub fn ipv4_addrs(&self) -> Vec<(String, String)> {
        let v = self.ip_json(&["-4", "addr", "show"]);
        let mut out = Vec::new();
        for l in v.as_array().expect("array") {
            for a in l["addr_info"].as_array().into_iter().flatten() {
                out.push((
                    l["ifname"].as_str().unwrap_or_default().to_owned(),
                    format!("{}/{}", a["local"].as_str().unwrap_or_default(), a["prefixlen"]),
                ));
            }
        }
        out.sort();
        out
    }

    pub fn link(&self, name: &str) -> serde_json::Value {
        let v = self.ip_json(&["-d", "link", "show", "dev", name]);
        v[0].clone()
    }

    pub fn sysctl(&self, key: &str) -> String {
        self.exec_ok(&["busybox", "sysctl", "-n", key]).trim().to_owned()
    }

    /// Whether one ping to `dst` is answered within a second.
    pub fn ping(&self, dst: &str) -> bool {
        self.exec(&["busybox", "ping", "-c", "1", "-W", "1", dst])
            .status
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for mut c in self
            .children
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A veth pair with one end in each namespace.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) {
    let tmp = format!("kv{}", COUNTER.fetch_add(1, Ordering::Relaxed));
    a.ip(&["link", "add", a_name, "type", "veth", "peer", "name", &tmp]);
    a.ip(&["link", "set", &tmp, "netns", &b.name]);
    b.ip(&["link", "set", &tmp, "name", b_name]);
    a.ip(&["link", "set", a_name, "up"]);
    b.ip(&["link", "set", b_name, "up"]);
}

pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn strip_keys(v: &mut serde_json::Value, keys: &[&str]) {
    match v {
        serde_json::Value::Object(m) => {
            for k in keys {
                m.remove(*k);
            }
            for (_, x) in m.iter_mut() {
                strip_keys(x, keys);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| strip_keys(x, keys)),
        _ => {}
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Parses a config text or panics with its diagnostics.
pub fn config(text: &str) -> keel_init::config::Config {
    match keel_init::config::parse_str(text) {
        Ok(l) => l.config,
        Err(d) => panic!("test config invalid:\n{}", d.render("test.yaml")),
    }
}

/// Runs `qemu-img ARGS` (QEMU's own image tool, the reference for image tests); panics
/// with its stderr unless it succeeds.
pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img: {e}; run ci/setup (package qemu-utils)"));
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
