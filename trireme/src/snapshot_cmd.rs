//! `trireme snapshot …` and `trireme volume clone`: snapshots and clones through a
//! node's admin API.

use anyhow::{Result, anyhow};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::cluster::ClusterDir;
use crate::volume_cmd::{comma_list, field, human, node, num, path_segment, print_json, strings};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a crash-consistent snapshot: it holds exactly the writes acknowledged
    /// before it. Instant, no data copied; exported read-only as nbd://…/VOLUME@NAME.
    Create {
        /// VOLUME@NAME.
        snapshot: String,
    },
    /// List snapshots, each with the space it alone holds (what deleting it gives back).
    List {
        /// Only this volume's snapshots.
        volume: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot and give back the space only it holds. Refused while clones
    /// read through to it.
    Delete {
        /// VOLUME@NAME.
        snapshot: String,
    },
    /// Make the volume read as the snapshot again (its size too). Every snapshot,
    /// older and newer, is kept. Refused while an NBD client has the volume attached
    /// for writing, unless --force.
    Rollback {
        /// VOLUME@NAME.
        snapshot: String,
        /// Roll back even while clients have the volume attached for writing: their
        /// writes wait for the rollback, and their cached view of the disk is stale.
        #[arg(long)]
        force: bool,
    },
}

/// `VOLUME@NAME` as the two path segments of the admin API.
fn snapshot_path(s: &str) -> Result<String> {
    let (volume, name) = engine::parse_snapshot_ref(s).map_err(|e| anyhow!("{e}"))?;
    Ok(format!("/v1/volumes/{volume}/snapshots/{name}"))
}

fn created(v: &Value) -> String {
    let secs = num(v, "created");
    let days = secs / 86_400;
    let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02} {h:02}:{m:02}:{s:02}")
}

/// Run a snapshot command.
pub fn snapshot(dir: &ClusterDir, cmd: SnapshotCommand) -> Result<()> {
    let (client, nbd) = node(dir)?;
    match cmd {
        SnapshotCommand::Create { snapshot } => {
            let (volume, name) =
                engine::parse_snapshot_ref(&snapshot).map_err(|e| anyhow!("{e}"))?;
            let v = client.post(
                &format!("/v1/volumes/{volume}/snapshots"),
                &json!({ "name": name }),
            )?;
            println!(
                "created snapshot {volume}@{} ({}): nbd://{nbd}/{volume}@{} (read-only)",
                field(&v, "name"),
                human(num(&v, "size")),
                field(&v, "name"),
            );
        }
        SnapshotCommand::List { volume, json } => {
            let path = match &volume {
                Some(v) => format!("/v1/volumes/{}/snapshots", path_segment(v)?),
                None => "/v1/snapshots".to_string(),
            };
            let v = client.get(&path)?;
            if json {
                return print_json(&v);
            }
            println!(
                "{:<36} {:>10} {:>12}  {:<19}  CLONES",
                "SNAPSHOT", "SIZE", "EXCLUSIVE", "CREATED (UTC)"
            );
            for s in v.as_array().into_iter().flatten() {
                println!(
                    "{:<36} {:>10} {:>12}  {:<19}  {}",
                    format!("{}@{}", field(s, "volume"), field(s, "name")),
                    human(num(s, "size")),
                    human(num(s, "exclusive_bytes")),
                    created(s),
                    comma_list(&strings(s, "clones"), "-")
                );
            }
        }
        SnapshotCommand::Delete { snapshot } => {
            let v = client.delete(&snapshot_path(&snapshot)?)?;
            println!(
                "deleted snapshot {snapshot}: {} given back",
                human(num(&v, "freed_bytes"))
            );
        }
        SnapshotCommand::Rollback { snapshot, force } => {
            let v = client.post(
                &format!("{}/rollback", snapshot_path(&snapshot)?),
                &json!({ "force": force }),
            )?;
            let volume = &v["volume"];
            let writers = num(&v, "attached_writers");
            println!(
                "rolled back volume {} to snapshot {snapshot} ({}){}",
                field(volume, "name"),
                human(num(volume, "size")),
                if writers > 0 {
                    format!(
                        "; forced with {writers} connection(s) attached for writing: \
                         restart their guests"
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}

/// `trireme volume clone VOLUME@SNAPSHOT NEW`.
pub fn clone(dir: &ClusterDir, source: &str, name: &str, tenant: Option<&str>) -> Result<()> {
    path_segment(name)?;
    let path = format!("{}/clone", snapshot_path(source)?);
    let (client, nbd) = node(dir)?;
    let v = client.post(&path, &json!({ "name": name, "tenant": tenant }))?;
    println!(
        "created volume {} as a clone of {source} ({}, tenant {}): nbd://{nbd}/{}",
        field(&v, "name"),
        human(num(&v, "size")),
        field(&v, "tenant"),
        field(&v, "name"),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::created;

    #[test]
    fn dates() {
        assert_eq!(
            created(&serde_json::json!({ "created": 0 })),
            "1970-01-01 00:00:00"
        );
        assert_eq!(
            created(&serde_json::json!({ "created": 1_796_688_000u64 })),
            "2026-12-08 00:00:00"
        );
        assert_eq!(
            created(&serde_json::json!({ "created": 951_782_400u64 })),
            "2000-02-29 00:00:00"
        );
    }
}
