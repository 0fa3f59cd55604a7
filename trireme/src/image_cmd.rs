//! `trireme volume import` and `trireme volume export`: images streamed into and out of
//! volumes through the node's NBD export, so they work against any node of a cluster.
//!
//! Import writes only the image's data: ranges the image says read as zeros are skipped,
//! and the fresh volume reads them as zeros (holes stay holes). A failed import deletes
//! the half-written volume.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use nbd_server::client::Client;
use serde_json::json;

use crate::volume_cmd::{field, human, node, path_segment};

/// Largest read from an image or a volume at once.
const STEP: u64 = 4 << 20;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The image file.
    file: PathBuf,
    /// Name of the new volume.
    name: String,
    /// The image's format: qcow2, vmdk, raw, iso, or auto (from the file's own magic;
    /// never from its contents beyond that).
    #[arg(long)]
    format: String,
    /// Owning tenant (default: the tenant "default").
    #[arg(long)]
    tenant: Option<String>,
    /// Storage class of the new volume.
    #[arg(long, default_value = "local")]
    class: String,
    /// Folder in which files named inside the image (backing files, external data
    /// files, VMDK extents) may be opened. Without it, such images are refused.
    #[arg(long, value_name = "DIR")]
    allow_references: Option<PathBuf>,
    /// QCOW2: import this internal snapshot (name or id) instead of the active layer.
    #[arg(long)]
    snapshot: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The volume to export, or one of its snapshots as VOLUME@SNAPSHOT.
    name: String,
    /// The file to write (created; refused if it exists).
    file: PathBuf,
    /// Output format: raw (sparse) or qcow2 (sparse, version 3, 64 KiB clusters).
    #[arg(long, default_value = "raw")]
    format: String,
}

/// Counters shown while copying and in the summary.
#[derive(Debug, Default)]
struct Progress {
    total: u64,
    done: u64,
    data: u64,
    skipped: u64,
    started: Option<Instant>,
    last_draw: Option<Instant>,
}

impl Progress {
    fn new(total: u64) -> Progress {
        Progress {
            total,
            started: Some(Instant::now()),
            ..Progress::default()
        }
    }

    fn elapsed(&self) -> Duration {
        self.started.map(|s| s.elapsed()).unwrap_or_default()
    }

    /// Redraws the bar on a terminal, at most five times a second.
    fn draw(&mut self, force: bool) {
        let stderr = std::io::stderr();
        if !stderr.is_terminal() {
            return;
        }
        let now = Instant::now();
        if !force
            && self
                .last_draw
                .is_some_and(|t| now - t < Duration::from_millis(200))
        {
            return;
        }
        self.last_draw = Some(now);
        let percent = (u128::from(self.done) * 100)
            .checked_div(u128::from(self.total))
            .unwrap_or(100);
        let filled = usize::try_from(percent * 30 / 100).unwrap_or(30);
        let _ = write!(
            stderr.lock(),
            "\r[{:<30}] {percent:>3}%  {} of {}  {}/s ",
            "#".repeat(filled),
            human(self.done),
            human(self.total),
            human(rate(self.data, self.elapsed())),
        );
        if force {
            let _ = writeln!(stderr.lock());
        }
    }
}

/// Bytes per second over `elapsed`.
fn rate(bytes: u64, elapsed: Duration) -> u64 {
    let ms = elapsed.as_millis().max(1);
    u64::try_from(u128::from(bytes) * 1000 / ms).unwrap_or(u64::MAX)
}

pub fn import(dir: &crate::cluster::ClusterDir, args: ImportArgs) -> Result<()> {
    path_segment(&args.name)?;
    let format = if args.format == "auto" {
        image::Format::detect(&args.file)
            .with_context(|| format!("reading the magic of {}", args.file.display()))?
    } else {
        image::Format::parse(&args.format).with_context(|| {
            format!(
                "unknown format {:?} (expected qcow2, vmdk, raw, iso or auto)",
                args.format
            )
        })?
    };
    let options = image::OpenOptions {
        allow_references: args.allow_references.clone(),
        snapshot: args.snapshot.clone(),
        limits: image::Limits::default(),
    };
    let mut disk = image::open(&args.file, format, &options)
        .with_context(|| format!("opening {} as {format}", args.file.display()))?;
    for warning in disk.warnings() {
        eprintln!("warning: {warning}");
    }
    let virtual_size = disk.virtual_size();
    if virtual_size == 0 {
        bail!("{} has a virtual size of 0 bytes", args.file.display());
    }
    // Volumes are sized in 512-byte units; an odd-sized raw file gets a zero tail.
    let size = virtual_size.div_ceil(512) * 512;

    let (admin, nbd) = node(dir)?;
    let body =
        json!({ "name": args.name, "size": size, "tenant": args.tenant, "class": args.class });
    let created = admin.post("/v1/volumes", &body)?;
    let copied = copy_into_volume(&mut *disk, nbd, &args.name);
    let progress = match copied {
        Ok(p) => p,
        Err(e) => {
            // Never leave a half-imported volume behind under the requested name.
            let removed = admin.delete(&format!("/v1/volumes/{}", args.name));
            let what = if removed.is_ok() {
                "the new volume was deleted"
            } else {
                "deleting the new volume failed too"
            };
            return Err(e.context(format!("importing into volume {} ({what})", args.name)));
        }
    };
    if format == image::Format::Iso {
        admin.post(
            &format!("/v1/volumes/{}/read-only", args.name),
            &json!({ "read_only": true }),
        )?;
    }
    let secs = progress.elapsed().as_secs_f64();
    println!(
        "imported {} ({format}, {}) into volume {} (tenant {}, class {}{})",
        args.file.display(),
        human(virtual_size),
        args.name,
        field(&created, "tenant"),
        field(&created, "class"),
        if format == image::Format::Iso {
            ", read-only"
        } else {
            ""
        },
    );
    println!(
        "read {} of data, wrote {}, skipped {} of zeros and holes, in {secs:.1} s ({}/s)",
        human(progress.data),
        human(progress.data),
        human(progress.skipped),
        human(rate(progress.data, progress.elapsed())),
    );
    println!("export: nbd://{nbd}/{}", args.name);
    Ok(())
}

/// Streams every data segment of `disk` into the export `name`, then flushes.
fn copy_into_volume(
    disk: &mut dyn image::DiskImage,
    nbd: std::net::SocketAddr,
    name: &str,
) -> Result<Progress> {
    let mut client = Client::connect_tcp(nbd, name)?;
    let size = disk.virtual_size();
    let mut progress = Progress::new(size);
    // Page-aligned: the kernel copies from the page cache into an unaligned buffer
    // about 4× slower (measured on the VMDK reader).
    let mut storage = vec![0u8; usize::try_from(STEP)? + 4096];
    let start = storage.as_ptr().align_offset(4096);
    let buf = &mut storage[start..start + usize::try_from(STEP)?];
    let mut offset = 0u64;
    while offset < size {
        let segment = disk
            .segment(offset, size - offset)
            .with_context(|| format!("mapping the image at offset {offset}"))?;
        if segment.offset != offset || segment.length == 0 || segment.length > size - offset {
            bail!("the image reader returned a bad segment at offset {offset}: {segment:?}");
        }
        match segment.kind {
            image::SegmentKind::Zero => progress.skipped += segment.length,
            image::SegmentKind::Data => {
                let end = offset + segment.length;
                let mut at = offset;
                while at < end {
                    let len = usize::try_from((end - at).min(STEP))?;
                    disk.read_at(at, &mut buf[..len])
                        .with_context(|| format!("reading the image at offset {at}"))?;
                    client
                        .write(at, &buf[..len])
                        .with_context(|| format!("writing the volume at offset {at}"))?;
                    at += len as u64;
                    progress.data += len as u64;
                    progress.done = at;
                    progress.draw(false);
                }
            }
        }
        offset += segment.length;
        progress.done = offset;
        progress.draw(false);
    }
    client.flush().context("flushing the volume")?;
    client.disconnect()?;
    progress.draw(true);
    Ok(progress)
}

pub fn export(dir: &crate::cluster::ClusterDir, args: ExportArgs) -> Result<()> {
    if args.name.contains('@') {
        engine::parse_snapshot_ref(&args.name).map_err(|e| anyhow::anyhow!("{e}"))?;
    } else {
        path_segment(&args.name)?;
    }
    let qcow2 = match args.format.as_str() {
        "raw" => false,
        "qcow2" => true,
        other => bail!("unknown export format {other:?} (expected raw or qcow2)"),
    };
    let (_, nbd) = node(dir)?;
    let mut client = Client::connect_tcp(nbd, &args.name)?;
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(&args.file)
        .with_context(|| format!("creating {}", args.file.display()))?;
    let size = client.size();
    let mut progress = Progress::new(size);
    let result = if qcow2 {
        let mut out = image::qcow2_writer::Qcow2Writer::new(&file, size)?;
        copy_out_of_volume(&mut client, &mut progress, |at, data| {
            out.write(at, data).map_err(anyhow::Error::from)
        })
        .and_then(|()| out.finish().map_err(anyhow::Error::from))
    } else {
        file.set_len(size)
            .with_context(|| format!("sizing {}", args.file.display()))?;
        copy_out_of_volume(&mut client, &mut progress, |at, data| {
            file.write_all_at(data, at)
                .with_context(|| format!("writing {} at offset {at}", args.file.display()))
        })
    };
    if let Err(e) = result.and_then(|()| file.sync_all().context("syncing the file")) {
        let _ = std::fs::remove_file(&args.file);
        return Err(e.context(format!(
            "exporting volume {} (the file was removed)",
            args.name
        )));
    }
    client.disconnect()?;
    progress.draw(true);
    println!(
        "exported volume {} ({}) to {} ({}): {} of data, {} of holes skipped, in {:.1} s",
        args.name,
        human(size),
        args.file.display(),
        args.format,
        human(progress.data),
        human(progress.skipped),
        progress.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// Reads every allocated, non-zero run of the export and hands each 4 KiB-aligned
/// piece that is not all zeros to `sink` (so the output stays sparse).
fn copy_out_of_volume(
    client: &mut Client,
    progress: &mut Progress,
    mut sink: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let size = client.size();
    let mut buf = vec![0u8; usize::try_from(STEP)?];
    let mut offset = 0u64;
    while offset < size {
        let runs = client
            .block_status(offset, (size - offset).min(1 << 30))?
            .unwrap_or_else(|| {
                vec![nbd_server::client::Allocation {
                    length: size - offset,
                    hole: false,
                    zero: false,
                }]
            });
        for run in runs {
            let length = run.length.min(size - offset);
            if run.zero {
                progress.skipped += length;
            } else {
                let end = offset + length;
                let mut at = offset;
                while at < end {
                    let len = usize::try_from((end - at).min(STEP))?;
                    client
                        .read(at, &mut buf[..len])
                        .with_context(|| format!("reading the volume at offset {at}"))?;
                    let mut piece_at = at;
                    for piece in buf[..len].chunks(4096) {
                        if piece.iter().any(|&b| b != 0) {
                            sink(piece_at, piece)?;
                            progress.data += piece.len() as u64;
                        } else {
                            progress.skipped += piece.len() as u64;
                        }
                        piece_at += piece.len() as u64;
                    }
                    at += len as u64;
                    progress.done = at;
                    progress.draw(false);
                }
            }
            offset += length;
            if offset >= size {
                break;
            }
        }
    }
    Ok(())
}
