//! keel-init: Keel's PID 1. See `keel_init::pid1` for what it does.

use std::path::PathBuf;

const HELP: &str = "\
keel-init: the init (PID 1) of a Keel appliance.

The kernel starts it from the image's initramfs. It mounts the system
filesystems, loads kernel modules, reads keel.yaml from the KEEL-CONFIG
partition and starts the declared guests, each in its own keel-vmm, and serves
the control API on /run/keel/api.sock.

Signals: SIGTERM or Ctrl-Alt-Del (SIGINT) reboot, SIGUSR2 powers off; guests
are stopped gracefully first. Operators use `keelctl`, not this program.

Usage: keel-init [--help | --version]
       keel-init --test-mode --root DIR --config FILE --vmm PATH [--api-socket PATH]

Test mode (not PID 1; for integration tests and development): no mounts,
modules, networking or power actions; the supervisor and the control API run
with every appliance path under DIR (DIR/run/keel/api.sock,
DIR/var/lib/keel/pools/..., DIR/run/keel/config/keel.yaml). SIGTERM or SIGINT
stops the guests and exits.

Example:
  keel-init --test-mode --root /tmp/keel --config lab.yaml \\
            --vmm target/debug/keel-vmm &
  keelctl --socket /tmp/keel/run/keel/api.sock list
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // As PID 1 every argument is a kernel command-line word the kernel did not know
    // (`nokaslr`, `single`, ...): refusing one would panic the kernel.
    if std::process::id() == 1 {
        keel_init::pid1::run(&args);
    }
    match args.first().map(String::as_str) {
        Some("--help" | "-h") => print!("{HELP}"),
        Some("--version" | "-V") => println!("keel-init {}", env!("CARGO_PKG_VERSION")),
        Some("--test-mode") => std::process::exit(test_mode(&args[1..])),
        Some(other) => usage_error(&format!("unknown argument `{other}`")),
        None => usage_error("must run as PID 1 (the appliance's init), or with --test-mode"),
    }
}

fn usage_error(msg: &str) -> ! {
    eprintln!("keel-init: error: {msg}; see `keel-init --help`");
    std::process::exit(2);
}

fn test_mode(args: &[String]) -> i32 {
    let (mut root, mut config, mut vmm, mut api_socket) = (None, None, None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--root" => &mut root,
            "--config" => &mut config,
            "--vmm" => &mut vmm,
            "--api-socket" => &mut api_socket,
            other => usage_error(&format!("unknown test-mode argument `{other}`")),
        };
        match it.next() {
            Some(v) => *slot = Some(PathBuf::from(v)),
            None => usage_error(&format!("{flag} needs a value")),
        }
    }
    let root = root.unwrap_or_else(|| usage_error("--test-mode needs --root DIR"));
    let config = config.unwrap_or_else(|| usage_error("--test-mode needs --config FILE"));
    let vmm = vmm.unwrap_or_else(|| usage_error("--test-mode needs --vmm PATH (the keel-vmm binary)"));
    let mut env = keel_init::pid1::Environment::under(&root, vmm);
    if let Some(sock) = api_socket {
        env.api_socket = sock;
    }
    keel_init::pid1::run_test_mode(env, &config)
}
