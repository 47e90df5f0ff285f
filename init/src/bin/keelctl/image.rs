//! `keelctl image import | list | rm`: disk images in the appliance's pools.

use clap::Subcommand;
use hyper::Method;
use keel_init::api::client::Client;
use keel_init::storage::image::ImageInfo;

use crate::output::{human_bytes, print_json, table};
use crate::upload;

pub const IMPORT_HELP: &str = "\
Examples:
  keelctl image import debian-12 debian-12-genericcloud-amd64.qcow2
  keelctl image import --pool bulk --sha256 5f2c...e1 debian-12 \\
      https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2
  keelctl --json image import debian-12 disk.raw

raw and qcow2 (v2 and v3, zlib-compressed clusters) are accepted; qcow2 is converted to
a sparse raw file on the appliance. With --sha256 the file is checked before the image
becomes visible. Images with a backing file are refused (flatten them first:
qemu-img convert -O qcow2 IN OUT). A guest's disk then says
  source: POOL/images/NAME.raw";

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a raw or qcow2 disk image (a file, or an http(s) URL) into a pool.
    #[command(after_help = IMPORT_HELP)]
    Import {
        /// The image's name: lowercase letters, digits, `.`, `_`, `-`.
        name: String,
        /// A file, or an http(s) URL that keelctl downloads and streams on.
        source: String,
        /// The pool [default: the only one declared].
        #[arg(long)]
        pool: Option<String>,
        /// Expected sha256 of the file (64 hex digits).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
    },
    /// List the imported images.
    #[command(alias = "ls")]
    List,
    /// Remove an image (volumes already made from it stay).
    Rm {
        name: String,
        #[arg(long)]
        pool: Option<String>,
    },
}

fn query(pool: &Option<String>, sha256: &Option<String>) -> String {
    let mut q = Vec::new();
    if let Some(p) = pool {
        q.push(format!("pool={}", crate::percent_encode(p)));
    }
    if let Some(s) = sha256 {
        q.push(format!("sha256={}", crate::percent_encode(s)));
    }
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

pub async fn run(client: &Client, cmd: ImageCommand, json: bool) -> anyhow::Result<u8> {
    match cmd {
        ImageCommand::Import {
            name,
            source,
            pool,
            sha256,
        } => {
            let path = format!("/v1/images/{}{}", crate::percent_encode(&name), query(&pool, &sha256));
            let started = std::time::Instant::now();
            let bytes = upload::upload(
                client,
                Method::PUT,
                &path,
                "application/octet-stream",
                &source,
                "uploading",
            )
            .await?;
            let info: ImageInfo = serde_json::from_slice(&bytes)?;
            if json {
                print_json(&info);
            } else {
                println!(
                    "imported {} into pool {} in {:.1}s: {} {}, {} allocated, sha256 {}",
                    info.name,
                    info.pool,
                    started.elapsed().as_secs_f64(),
                    info.format,
                    human_bytes(info.virtual_size),
                    human_bytes(info.allocated),
                    info.sha256
                );
                println!("use it as a disk's source: {}", info.source);
            }
        }
        ImageCommand::List => {
            let images: Vec<ImageInfo> = client.json(Method::GET, "/v1/images", None).await?;
            if json {
                print_json(&images);
            } else if images.is_empty() {
                println!("no images (keelctl image import NAME FILE adds one)");
            } else {
                let mut rows = vec![
                    ["NAME", "POOL", "FORMAT", "SIZE", "ALLOCATED", "SOURCE"]
                        .map(String::from)
                        .to_vec(),
                ];
                for i in &images {
                    rows.push(vec![
                        i.name.clone(),
                        i.pool.clone(),
                        i.format.clone(),
                        human_bytes(i.virtual_size),
                        human_bytes(i.allocated),
                        i.source.clone(),
                    ]);
                }
                table(&rows);
            }
        }
        ImageCommand::Rm { name, pool } => {
            let path = format!("/v1/images/{}{}", crate::percent_encode(&name), query(&pool, &None));
            let info: ImageInfo = client.json(Method::DELETE, &path, None).await?;
            if json {
                print_json(&info);
            } else {
                println!("removed image {} from pool {}", info.name, info.pool);
            }
        }
    }
    Ok(0)
}
