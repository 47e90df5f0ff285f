//! keel-init: Keel's PID 1. See `keel_init::pid1` for what it does.

const HELP: &str = "\
keel-init: the init (PID 1) of a Keel appliance.

The kernel starts it from the image's initramfs. It mounts the system
filesystems, loads kernel modules, reads keel.yaml from the KEEL-CONFIG
partition and starts the declared guests, each in its own keel-vmm.

Signals: SIGTERM or Ctrl-Alt-Del (SIGINT) reboot, SIGUSR2 powers off; guests
are stopped gracefully first. Operators use `keelctl`, not this program.

Usage: keel-init [--help | --version]
";

fn main() {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--help" | "-h") => print!("{HELP}"),
        Some("--version" | "-V") => println!("keel-init {}", env!("CARGO_PKG_VERSION")),
        Some(other) => {
            eprintln!("keel-init: error: unknown argument `{other}`; see `keel-init --help`");
            std::process::exit(2);
        }
        None if std::process::id() != 1 => {
            eprintln!("keel-init: error: must run as PID 1 (the appliance's init); see `keel-init --help`");
            std::process::exit(2);
        }
        None => keel_init::pid1::run(),
    }
}
