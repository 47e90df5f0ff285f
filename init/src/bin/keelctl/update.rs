//! `keelctl update FILE|URL` and `keelctl rollback`.
//!
//! The bundle is streamed (`upload`), never held whole; the appliance verifies while
//! it receives and writes nothing final unless the whole bundle checks out. A download
//! is not trusted for being HTTPS: the appliance checks the signature either way.

use hyper::Method;
use keel_init::api::client::Client;
use keel_init::api::update::{RollbackResult, UpdateResult};

use crate::upload;

pub async fn update(
    client: &Client,
    source: &str,
    reboot: bool,
    allow_downgrade: bool,
    json: bool,
) -> anyhow::Result<u8> {
    let query = format!(
        "/v1/update?allow_downgrade={}&reboot={}",
        u8::from(allow_downgrade),
        u8::from(reboot)
    );
    let bytes = upload::upload(
        client,
        Method::POST,
        &query,
        "application/vnd.keel.bundle",
        source,
        "uploading and verifying",
    )
    .await?;
    let result: UpdateResult = serde_json::from_slice(&bytes)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        let i = &result.installed;
        println!(
            "installed Keel {} as {} ({:.1} MiB, sha256 {})",
            i.version,
            i.file,
            i.size as f64 / 1048576.0,
            i.sha256
        );
        for r in &i.removed {
            println!("  removed {r}");
        }
        if let Some(d) = &i.demoted {
            println!(
                "  downgrade: the running version is now {d} (boots only if {} fails)",
                i.version
            );
        }
        if result.rebooting {
            println!(
                "rebooting into {} now; it is blessed once healthy, or rolled back after 3 tries",
                i.version
            );
        } else {
            println!(
                "reboot to start it (`keelctl update --reboot` does); it is blessed once healthy, or rolled back after 3 tries"
            );
        }
    }
    Ok(0)
}

pub async fn rollback(client: &Client, reboot: bool, json: bool) -> anyhow::Result<u8> {
    let r: RollbackResult = client
        .json(Method::POST, &format!("/v1/rollback?reboot={}", u8::from(reboot)), None)
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let rb = &r.rolled_back;
        println!("Keel {} boots next (running: {})", rb.to, rb.from);
        for x in &rb.renamed {
            println!("  renamed {} → {}", x.from, x.to);
        }
        for x in &rb.removed {
            println!("  removed {x}");
        }
        if r.rebooting {
            println!("rebooting now");
        } else {
            println!("reboot to start it (`keelctl rollback --reboot` does)");
        }
    }
    Ok(0)
}
