//! `keelctl volume list | create | resize | clone | rm`: the volumes in the pools.

use clap::Subcommand;
use hyper::Method;
use keel_init::api::client::Client;
use keel_init::storage::volume_admin::VolumeInfo;

use crate::output::{human_bytes, print_json, table};
use crate::percent_encode;

pub const VOLUME_HELP: &str = "\
Examples:
  keelctl volume list
  keelctl volume create fast/scratch 20GiB
  keelctl volume resize fast/web-root 40GiB      # grow only; the guest sees it at its next start
  keelctl volume clone fast/web-root fast/web-root-before-upgrade
  keelctl volume rm fast/scratch
  keelctl volume rm --force fast/old-root        # even though a declared guest names it

Keel never removes a volume by itself: a guest taken out of keel.yaml leaves its
volumes where they were. `rm` is refused for a volume a running guest has open, and
for one a declared guest uses unless --force.";

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// The volumes in every pool, their size, allocation and users.
    #[command(alias = "ls")]
    List,
    /// A new sparse volume.
    Create {
        /// POOL/NAME
        name: String,
        /// e.g. 20GiB
        size: String,
    },
    /// Grow a volume (never shrinks).
    Resize { name: String, size: String },
    /// Copy a volume (a reflink where KEEL-DATA can; stop its guest for a consistent copy).
    Clone { from: String, to: String },
    /// Remove a volume: the operator's explicit act.
    Rm {
        name: String,
        /// Also when a declared guest uses it (never while one runs).
        #[arg(long)]
        force: bool,
    },
}

fn print(info: &VolumeInfo, json: bool, what: &str) {
    if json {
        print_json(info);
    } else {
        println!(
            "{what} {}: {}, {} allocated",
            info.name,
            human_bytes(info.size),
            human_bytes(info.allocated)
        );
    }
}

pub async fn run(client: &Client, cmd: VolumeCommand, json: bool) -> anyhow::Result<u8> {
    let call = |method: Method, path: String| async move { client.json::<VolumeInfo>(method, &path, None).await };
    match cmd {
        VolumeCommand::List => {
            let vols: Vec<VolumeInfo> = client.json(Method::GET, "/v1/volumes", None).await?;
            if json {
                print_json(&vols);
            } else if vols.is_empty() {
                println!("no volumes");
            } else {
                let mut rows = vec![["VOLUME", "SIZE", "ALLOCATED", "USED BY"].map(String::from).to_vec()];
                for v in &vols {
                    let users = if v.used_by.is_empty() {
                        "-".into()
                    } else {
                        v.used_by.join(", ")
                    };
                    rows.push(vec![
                        v.name.clone(),
                        human_bytes(v.size),
                        human_bytes(v.allocated),
                        users,
                    ]);
                }
                table(&rows);
            }
        }
        VolumeCommand::Create { name, size } => {
            let path = format!(
                "/v1/volumes?name={}&size={}",
                percent_encode(&name),
                percent_encode(&size)
            );
            print(&call(Method::POST, path).await?, json, "created");
        }
        VolumeCommand::Resize { name, size } => {
            let path = format!(
                "/v1/volumes/resize?name={}&size={}",
                percent_encode(&name),
                percent_encode(&size)
            );
            print(&call(Method::POST, path).await?, json, "resized");
        }
        VolumeCommand::Clone { from, to } => {
            let path = format!(
                "/v1/volumes/clone?name={}&to={}",
                percent_encode(&from),
                percent_encode(&to)
            );
            print(&call(Method::POST, path).await?, json, "cloned into");
        }
        VolumeCommand::Rm { name, force } => {
            let path = format!("/v1/volumes?name={}&force={}", percent_encode(&name), u8::from(force));
            print(&call(Method::DELETE, path).await?, json, "removed");
        }
    }
    Ok(0)
}
