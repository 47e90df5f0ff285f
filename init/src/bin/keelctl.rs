//! keelctl: the operator's CLI for a Keel appliance. Talks to keel-init's control
//! API (`keel_init::api`) over the root-only unix socket, or over TCP with a token.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hyper::{Method, StatusCode};
use keel_init::api::client::{Client, ClientError, Endpoint};
use keel_init::api::host::HostInfo;
use keel_init::api::{ApplyResult, GuestDetail};
use keel_init::guest::GuestStatus;

// A directory, not src/bin/update.rs, which Cargo would take for a binary of its own.
#[path = "keelctl/console.rs"]
mod console;
#[path = "keelctl/image.rs"]
mod image;
#[path = "keelctl/output.rs"]
mod output;
#[path = "keelctl/update.rs"]
mod update;
#[path = "keelctl/upload.rs"]
mod upload;
#[path = "keelctl/volume.rs"]
mod volume;

use console::console;
use output::*;

const AFTER_HELP: &str = "\
Examples:
  keelctl list                      # every guest, its state and uptime
  keelctl status web                # one guest in detail, with live VMM stats
  keelctl start web                 # start a stopped guest
  keelctl stop web                  # power button, wait up to 30s, then kill
  keelctl stop --force web          # kill its VMM now
  keelctl reboot web                # graceful stop, then start again
  keelctl reset web                 # hard reset (kill and start)
  keelctl pause web; keelctl resume web
  keelctl console web               # interactive serial console; Ctrl-] detaches
  keelctl logs -f web               # console output, following
  keelctl apply keel.yaml --dry-run # what would change
  keelctl apply keel.yaml           # validate, persist, reconcile
  keelctl diff keel.yaml            # field-by-field differences
  keelctl host                      # versions, boot slots, CPU, memory, pools
  keelctl metrics                   # Prometheus text
  keelctl image import debian-12 debian-12-genericcloud-amd64.qcow2   # into a pool
  keelctl image list
  keelctl volume list; keelctl volume clone fast/web fast/web-copy
  keelctl update --reboot keel-1.2.0.keel   # install an OS update (file or URL)
  keelctl rollback --reboot         # back to the previous OS version
  keelctl --host http://10.0.0.2:7070 --token-file ~/.keel-token list
  keelctl --json list | jq '.[].state'

Exit codes:
  0 success                               4 no such guest
  1 failed (also: a started guest crashed) 5 the guest's state does not allow it
  2 usage error                           6 invalid config (apply, diff)
  3 cannot reach the API, or not allowed  7 diff: the config differs
                                          8 update: the bundle was refused";

const UPDATE_HELP: &str = "\
Examples:
  keelctl update keel-1.2.0.keel
  keelctl update --reboot https://updates.example.com/keel-1.2.0.keel
  keelctl update --allow-downgrade keel-1.1.0.keel

The appliance checks the bundle's signature against the keys built into its image and
the UKI's sha256 while it receives it, and writes nothing final unless all of it checks
out. The new version boots with 3 tries; it is blessed once the system is healthy for
update.health_window, else the previous version boots again by itself.
Exit code 8: the appliance refused the bundle (signature, hash, version, space).";

/// Exit codes (see `--help`).
const EXIT_FAILED: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_NO_SUCH_GUEST: u8 = 4;
const EXIT_WRONG_STATE: u8 = 5;
const EXIT_INVALID_CONFIG: u8 = 6;
const EXIT_DIFFERS: u8 = 7;
const EXIT_UPDATE_REFUSED: u8 = 8;

/// Ctrl-] ends `keelctl console`, as in telnet and virsh.
const DETACH: u8 = 0x1d;

/// Control a Keel appliance: guests, console, config, host.
#[derive(Debug, Parser)]
#[command(name = "keelctl", version, after_help = AFTER_HELP)]
struct Cli {
    /// The API's unix socket.
    #[arg(long, global = true, value_name = "PATH", env = "KEEL_SOCKET", default_value = keel_init::layout::API_SOCKET)]
    socket: PathBuf,
    /// The API over TCP instead: http://HOST:PORT (host.api.listen).
    #[arg(long, global = true, value_name = "URL", env = "KEEL_HOST")]
    host: Option<String>,
    /// Bearer token for --host.
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "KEEL_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Read the bearer token for --host from a file.
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the guests.
    #[command(alias = "ls")]
    List,
    /// One guest in detail, with live stats from its VMM.
    Status { name: String },
    /// Start a guest (also one that crash-looped).
    Start { name: String },
    /// Stop a guest: power button, then kill after the timeout.
    Stop {
        name: String,
        /// Kill its VMM now instead (same as `destroy`).
        #[arg(long)]
        force: bool,
        /// Seconds the guest gets before its VMM is killed [default: the guest's
        /// `stop_timeout` in keel.yaml, 30 s unless set].
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
    },
    /// Gracefully stop a guest, then start it again.
    Reboot {
        name: String,
        /// Seconds the guest gets before its VMM is killed [default: its `stop_timeout`].
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
    },
    /// Hard reset: kill the VMM and start the guest again.
    Reset { name: String },
    /// Freeze all vCPUs of a guest.
    Pause { name: String },
    /// Let a paused guest run again.
    Resume { name: String },
    /// Kill a guest's VMM now; the guest stays stopped.
    Destroy { name: String },
    /// Attach to a guest's serial console (Ctrl-] detaches).
    Console {
        name: String,
        /// Bytes of recent output to show first.
        #[arg(long, value_name = "BYTES", default_value_t = 2048)]
        replay: usize,
    },
    /// A guest's console output.
    Logs {
        name: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines (0: all that is kept).
        #[arg(short = 'n', long, value_name = "N", default_value_t = 0)]
        lines: usize,
    },
    /// Apply a keel.yaml: validate, persist to KEEL-CONFIG, reconcile guests.
    Apply {
        file: PathBuf,
        /// Only show what would change.
        #[arg(long)]
        dry_run: bool,
        /// Seconds each guest being stopped or restarted gets.
        #[arg(long, value_name = "SECS", default_value_t = 30.0)]
        stop_timeout: f64,
    },
    /// Show how a keel.yaml differs from the applied config (exit 7 if it does).
    Diff { file: PathBuf },
    /// The appliance: versions, boot slots, uptime, CPU, memory, pools.
    Host,
    /// Prometheus metrics, as served on /metrics.
    Metrics,
    /// Install an OS update: a bundle file or an http(s) URL, verified by the appliance.
    #[command(after_help = UPDATE_HELP)]
    Update {
        /// The bundle (`keel-image bundle` makes one): a path, or an http:// or https:// URL.
        source: String,
        /// Reboot into the new version once it is installed.
        #[arg(long)]
        reboot: bool,
        /// Accept a bundle older than the running version.
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// Disk images in the pools: import (raw or qcow2, with progress), list, rm.
    Image {
        #[command(subcommand)]
        cmd: image::ImageCommand,
    },
    /// Volumes in the pools: list, create, resize, clone, rm.
    #[command(after_help = volume::VOLUME_HELP)]
    Volume {
        #[command(subcommand)]
        cmd: volume::VolumeCommand,
    },
    /// Make the previous OS version boot next.
    #[command(
        after_help = "Examples:\n  keelctl rollback            # takes effect at the next reboot\n  keelctl rollback --reboot\n\nThe running version is marked as out of tries (it still boots if nothing else can);\nan installed update that has not booted yet is removed."
    )]
    Rollback {
        /// Reboot now.
        #[arg(long)]
        reboot: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keelctl: error: cannot start: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("keelctl: error: {e:#}");
            if let Some(ClientError::Api { body, .. }) = e.downcast_ref::<ClientError>() {
                for d in &body.details {
                    eprintln!("  {d}");
                }
            }
            ExitCode::from(exit_code_for(&e))
        }
    }
}

/// The appliance refused an update bundle (as opposed to not being reachable).
fn refused(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<ClientError>(),
        Some(ClientError::Api { status, .. })
            if matches!(*status, StatusCode::UNPROCESSABLE_ENTITY | StatusCode::CONFLICT | StatusCode::INSUFFICIENT_STORAGE)
    )
}

fn exit_code_for(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Connect { .. }) => EXIT_UNREACHABLE,
        Some(ClientError::Api { status, .. }) => match *status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => EXIT_UNREACHABLE,
            StatusCode::NOT_FOUND => EXIT_NO_SUCH_GUEST,
            StatusCode::CONFLICT => EXIT_WRONG_STATE,
            StatusCode::UNPROCESSABLE_ENTITY => EXIT_INVALID_CONFIG,
            _ => EXIT_FAILED,
        },
        _ => EXIT_FAILED,
    }
}

fn endpoint(cli: &Cli) -> anyhow::Result<Endpoint> {
    let Some(url) = &cli.host else {
        return Ok(Endpoint::Unix(cli.socket.clone()));
    };
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("--token-file {}", f.display()))?
            .trim()
            .to_string(),
        (None, None) => anyhow::bail!("--host needs --token TOKEN, --token-file FILE or KEEL_TOKEN"),
    };
    Endpoint::from_url(url, token).map_err(anyhow::Error::msg)
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let client = Client::new(endpoint(&cli)?);
    let json = cli.json;
    match cli.command {
        Command::List => {
            let guests: Vec<GuestStatus> = client.json(Method::GET, "/v1/guests", None).await?;
            if json {
                print_json(&guests);
            } else {
                print_guest_table(&guests);
            }
            Ok(0)
        }
        Command::Status { name } => {
            let d: GuestDetail = client.json(Method::GET, &format!("/v1/guests/{name}"), None).await?;
            if json {
                print_json(&d);
            } else {
                print_guest_detail(&d);
            }
            Ok(0)
        }
        Command::Start { name } => lifecycle(&client, &name, "start", "", json).await,
        Command::Stop { name, force, timeout } => {
            let query = if force {
                "?force=1".to_string()
            } else {
                timeout_query(timeout)
            };
            lifecycle(&client, &name, "stop", &query, json).await
        }
        Command::Reboot { name, timeout } => lifecycle(&client, &name, "reboot", &timeout_query(timeout), json).await,
        Command::Reset { name } => lifecycle(&client, &name, "reset", "", json).await,
        Command::Pause { name } => lifecycle(&client, &name, "pause", "", json).await,
        Command::Resume { name } => lifecycle(&client, &name, "resume", "", json).await,
        Command::Destroy { name } => lifecycle(&client, &name, "destroy", "", json).await,
        Command::Console { name, replay } => console(&client, &name, replay).await,
        Command::Logs { name, follow, lines } => {
            let path = format!(
                "/v1/guests/{name}/logs?lines={lines}{}",
                if follow { "&follow=1" } else { "" }
            );
            let resp = client.send(Method::GET, &path, None).await?;
            let mut body = resp.into_body();
            let mut out = std::io::stdout();
            while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
                if let Ok(data) = frame?.into_data() {
                    out.write_all(&data)?;
                    out.flush()?;
                }
            }
            Ok(0)
        }
        Command::Apply {
            file,
            dry_run,
            stop_timeout,
        } => {
            let result = post_config(&client, &file, dry_run, stop_timeout).await?;
            if json {
                print_json(&result);
            } else {
                for w in &result.warnings {
                    eprintln!("{w}");
                }
                print_plan(&result.plan, false);
                if result.applied {
                    for e in &result.host_errors {
                        eprintln!("keelctl: warning: {e}");
                    }
                    println!();
                    print_guest_table(&result.guests);
                } else {
                    println!("dry run: nothing was changed");
                }
            }
            let failed = result.applied && result.guests.iter().any(|g| g.state == "crashed");
            Ok(if failed || !result.host_errors.is_empty() {
                EXIT_FAILED
            } else {
                0
            })
        }
        Command::Diff { file } => {
            let result = post_config(&client, &file, true, 30.0).await?;
            if json {
                print_json(&result.plan);
            } else {
                print_plan(&result.plan, true);
            }
            Ok(if result.plan.is_noop() { 0 } else { EXIT_DIFFERS })
        }
        Command::Host => {
            let h: HostInfo = client.json(Method::GET, "/v1/host", None).await?;
            if json {
                print_json(&h);
            } else {
                print_host(&h);
            }
            Ok(0)
        }
        Command::Metrics => {
            let text = client.call(Method::GET, "/metrics", None).await?;
            std::io::stdout().write_all(&text)?;
            Ok(0)
        }
        Command::Update {
            source,
            reboot,
            allow_downgrade,
        } => match update::update(&client, &source, reboot, allow_downgrade, json).await {
            Err(e) if refused(&e) => {
                eprintln!("keelctl: error: {e:#}");
                Ok(EXIT_UPDATE_REFUSED)
            }
            other => other,
        },
        Command::Rollback { reboot } => update::rollback(&client, reboot, json).await,
        Command::Image { cmd } => image::run(&client, cmd, json).await,
        Command::Volume { cmd } => volume::run(&client, cmd, json).await,
    }
}

async fn lifecycle(client: &Client, name: &str, action: &str, query: &str, json: bool) -> anyhow::Result<u8> {
    let s: GuestStatus = client
        .json(Method::POST, &format!("/v1/guests/{name}/{action}{query}"), None)
        .await?;
    if json {
        print_json(&s);
    } else {
        let detail = s.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
        println!("{}: {}{detail}", s.name, s.state);
    }
    // A start that ended in a crash is a failure the caller must see.
    let failed = matches!(action, "start" | "reboot" | "reset") && matches!(s.state.as_str(), "crashed" | "backoff");
    Ok(if failed { EXIT_FAILED } else { 0 })
}

async fn post_config(client: &Client, file: &PathBuf, dry_run: bool, stop_timeout: f64) -> anyhow::Result<ApplyResult> {
    let text = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let name = file.display().to_string();
    let path = format!(
        "/v1/config?file={}&stop_timeout={stop_timeout}{}",
        percent_encode(&name),
        if dry_run { "&dry_run=1" } else { "" }
    );
    Ok(client
        .json(Method::POST, &path, Some(("application/yaml", text)))
        .await?)
}

/// Enough escaping for a file name in a query string.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `?timeout=SECS` when given; without it keel-init uses the guest's `stop_timeout`.
fn timeout_query(timeout: Option<f64>) -> String {
    timeout.map(|t| format!("?timeout={t}")).unwrap_or_default()
}
