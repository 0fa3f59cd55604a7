//! `trireme volume …` and `trireme tenant …`: admin commands sent to a node's admin API.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::admin_client::AdminClient;
use crate::cluster::ClusterDir;
use crate::dev::running_pid;

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a thin-provisioned, encrypted volume.
    Create {
        /// Volume name (also its NBD export name).
        name: String,
        /// Size, e.g. 10G, 512M, 1T, or bytes (a multiple of 512).
        #[arg(long)]
        size: String,
        /// Owning tenant (default: the tenant "default", created on first use).
        #[arg(long)]
        tenant: Option<String>,
        /// Storage class: local (one copy) or replicated (three datacenters).
        #[arg(long, default_value = "local")]
        class: String,
        /// Chunk size (a power of two, 4K to 1G; default 4M).
        #[arg(long)]
        chunk_size: Option<String>,
    },
    /// List volumes.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one volume, with the bytes it has allocated.
    Info {
        /// Volume name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume (shrinking is refused).
    Resize {
        /// Volume name.
        name: String,
        /// New size.
        #[arg(long)]
        size: String,
    },
    /// Change a volume's settings.
    Set {
        /// Volume name.
        name: String,
        /// Export read-only (true) or writable (false); new NBD connections see the
        /// flag, and writes on every connection are refused while it is set.
        #[arg(long, action = clap::ArgAction::Set)]
        read_only: bool,
    },
    /// Create a volume from a disk image (QCOW2, VMDK, raw, ISO), writing only its
    /// data. An ISO becomes a read-only volume.
    Import(crate::image_cmd::ImportArgs),
    /// Copy a volume into a file: raw or qcow2, both sparse.
    Export(crate::image_cmd::ExportArgs),
    /// Create a volume as a clone of a snapshot: instant, it shares every block it
    /// does not write with the snapshot. It stays in the snapshot's tenant.
    Clone {
        /// The snapshot, VOLUME@SNAPSHOT.
        source: String,
        /// Name of the new volume.
        name: String,
        /// Must be the origin's tenant if given (cross-tenant clones are refused).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Delete a volume with its snapshots and data (refused while it has clones).
    Delete {
        /// Volume name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant with a fresh encryption key.
    Create {
        /// Tenant name.
        name: String,
    },
    /// List tenants.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a tenant: its key is destroyed and its volumes with it.
    Delete {
        /// Tenant name.
        name: String,
    },
}

/// The admin API of a running node of the cluster.
fn client(dir: &ClusterDir) -> Result<AdminClient> {
    Ok(node(dir)?.0)
}

/// A running node of the cluster: its admin API and its NBD address.
pub(crate) fn node(dir: &ClusterDir) -> Result<(AdminClient, std::net::SocketAddr)> {
    let cluster = dir.load()?;
    match cluster
        .nodes
        .iter()
        .find(|n| running_pid(dir, &n.name).is_some())
    {
        Some(n) => Ok((AdminClient::new(&n.name, n.admin), n.nbd)),
        None => bail!(
            "node not running: no node of the cluster at {} is running (start it with `trireme --cluster {} dev up`)",
            dir.root().display(),
            dir.root().display()
        ),
    }
}

fn size_arg(s: &str) -> Result<u64> {
    engine::parse_size(s).map_err(anyhow::Error::msg)
}

/// Bytes as a short human figure (binary units).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit + 1 < UNITS.len() {
        whole /= 1024;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    // One decimal, computed in integers: tenths of the unit.
    let tenths = (u128::from(bytes) * 10) >> (10 * unit);
    format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
}

pub(crate) fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// The strings of the array field `k` (none when it is missing).
pub(crate) fn strings<'a>(v: &'a Value, k: &str) -> Vec<&'a str> {
    v.get(k)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// `a, b, c`, or `none` for an empty list.
pub(crate) fn comma_list(items: &[&str], none: &str) -> String {
    if items.is_empty() {
        none.to_string()
    } else {
        items.join(", ")
    }
}

pub(crate) fn num(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn print_volume(v: &Value) {
    println!("name:        {}", field(v, "name"));
    println!("tenant:      {}", field(v, "tenant"));
    println!("class:       {}", field(v, "class"));
    let access = if v.get("read_only").and_then(Value::as_bool) == Some(true) {
        "read-only"
    } else {
        "read-write"
    };
    println!("access:      {access}");
    println!(
        "size:        {} ({} bytes)",
        human(num(v, "size")),
        num(v, "size")
    );
    println!(
        "allocated:   {} ({} bytes)",
        human(num(v, "allocated_bytes")),
        num(v, "allocated_bytes")
    );
    if let Some(origin) = v.get("origin").and_then(Value::as_str) {
        println!("clone of:    {origin}");
    }
    println!("snapshots:   {}", num(v, "snapshots"));
    println!("chunk size:  {}", human(num(v, "chunk_size")));
    println!("block size:  {}", human(num(v, "block_size")));
    println!("export:      {}", field(v, "nbd_uri"));
}

/// Run a volume command.
pub fn volume(dir: &ClusterDir, cmd: VolumeCommand) -> Result<()> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            tenant,
            class,
            chunk_size,
        } => {
            let size = size_arg(&size)?;
            let chunk_size = chunk_size.as_deref().map(size_arg).transpose()?;
            let body = json!({ "name": name, "size": size, "tenant": tenant, "class": class, "chunk_size": chunk_size });
            let (client, nbd) = node(dir)?;
            let v = client.post("/v1/volumes", &body)?;
            println!(
                "created volume {} ({}, tenant {}, class {}): nbd://{nbd}/{}",
                field(&v, "name"),
                human(num(&v, "size")),
                field(&v, "tenant"),
                field(&v, "class"),
                field(&v, "name")
            );
        }
        VolumeCommand::List { json } => {
            let v = client(dir)?.get("/v1/volumes")?;
            if json {
                return print_json(&v);
            }
            println!(
                "{:<24} {:<12} {:<11} {:>12} {:>12}",
                "NAME", "TENANT", "CLASS", "SIZE", "ALLOCATED"
            );
            for vol in v.as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:<12} {:<11} {:>12} {:>12}",
                    field(vol, "name"),
                    field(vol, "tenant"),
                    field(vol, "class"),
                    human(num(vol, "size")),
                    human(num(vol, "allocated_bytes"))
                );
            }
        }
        VolumeCommand::Info { name, json } => {
            let (client, nbd) = node(dir)?;
            let mut v = client.get(&format!("/v1/volumes/{}", path_segment(&name)?))?;
            v["nbd_uri"] = format!("nbd://{nbd}/{name}").into();
            if json {
                return print_json(&v);
            }
            print_volume(&v);
        }
        VolumeCommand::Resize { name, size } => {
            let size = size_arg(&size)?;
            let v = client(dir)?.post(
                &format!("/v1/volumes/{}/resize", path_segment(&name)?),
                &json!({ "size": size }),
            )?;
            println!(
                "resized volume {} to {}",
                field(&v, "name"),
                human(num(&v, "size"))
            );
        }
        VolumeCommand::Set { name, read_only } => {
            let v = client(dir)?.post(
                &format!("/v1/volumes/{}/read-only", path_segment(&name)?),
                &json!({ "read_only": read_only }),
            )?;
            let access = if v.get("read_only").and_then(Value::as_bool) == Some(true) {
                "read-only"
            } else {
                "writable"
            };
            println!("volume {} is {access}", field(&v, "name"));
        }
        VolumeCommand::Import(args) => return crate::image_cmd::import(dir, args),
        VolumeCommand::Export(args) => return crate::image_cmd::export(dir, args),
        VolumeCommand::Clone {
            source,
            name,
            tenant,
        } => return crate::snapshot_cmd::clone(dir, &source, &name, tenant.as_deref()),
        VolumeCommand::Delete { name } => {
            client(dir)?.delete(&format!("/v1/volumes/{}", path_segment(&name)?))?;
            println!("deleted volume {name}");
        }
    }
    Ok(())
}

/// Run a tenant command.
pub fn tenant(dir: &ClusterDir, cmd: TenantCommand) -> Result<()> {
    match cmd {
        TenantCommand::Create { name } => {
            let v = client(dir)?.post("/v1/tenants", &json!({ "name": name }))?;
            println!("created tenant {}", field(&v, "name"));
        }
        TenantCommand::List { json } => {
            let v = client(dir)?.get("/v1/tenants")?;
            if json {
                return print_json(&v);
            }
            println!("{:<24} {:>8}", "TENANT", "VOLUMES");
            for t in v.as_array().into_iter().flatten() {
                println!("{:<24} {:>8}", field(t, "name"), num(t, "volumes"));
            }
        }
        TenantCommand::Delete { name } => {
            let v = client(dir)?.delete(&format!("/v1/tenants/{}", path_segment(&name)?))?;
            println!(
                "deleted tenant {name} and its key; volumes deleted: {}",
                comma_list(&strings(&v, "deleted_volumes"), "none")
            );
        }
    }
    Ok(())
}

/// Names go into URL paths; the engine only accepts `[A-Za-z0-9._-]`, so anything else
/// is refused here with the same message rather than escaped.
pub(crate) fn path_segment(name: &str) -> Result<&str> {
    engine::catalog::validate_name("volume or tenant", name)
        .map_err(anyhow::Error::msg)
        .context("bad name")?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::human;

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10.0 GiB");
    }
}
