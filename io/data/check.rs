//! `zeroconv dataset check`: scan shards, decode every sample as the loader would, and report what is usable.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::decode::{decode_sample, recycle_image, Fields};
use super::group::{SampleReader, ShardItem};
use super::loader::bad_message;
use super::shards::resolve_shards_lenient;
use crate::{Error, Result};

/// How many error strings the report lists (all are counted).
const MAX_ERRORS: usize = 100;

/// The result of a scan; also the JSON printed by `--json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Shard files found (missing ones are in `errors`).
    pub shards: usize,
    /// Usable samples: all members present and decodable.
    pub samples: u64,
    /// Samples that would be skipped.
    pub bad: u64,
    /// Shards that are missing, unreadable, not tar, or damaged part-way (their earlier samples still count).
    pub damaged_shards: usize,
    /// Shard problems first, then bad samples; each names its shard. At most 100 are listed.
    pub errors: Vec<String>,
    /// Problems not listed in `errors` because of the limit.
    pub errors_omitted: usize,
    /// Target image sizes ("WIDTHxHEIGHT") of usable samples, with counts.
    pub image_sizes: BTreeMap<String, u64>,
    /// Control map sizes of usable samples, with counts.
    pub control_sizes: BTreeMap<String, u64>,
    /// Bytes read.
    pub bytes: u64,
}

#[derive(Default)]
struct ShardScan {
    samples: u64,
    bad: u64,
    bytes: u64,
    damage: Option<String>,
    bad_messages: Vec<String>,
    image_sizes: BTreeMap<String, u64>,
    control_sizes: BTreeMap<String, u64>,
}

/// Scans the shards given by `specs` with `threads` threads (0: one per core). Only malformed patterns are errors;
/// everything wrong with the data is in the report.
pub fn check_shards(specs: &[String], fields: &Fields, threads: usize, progress: bool) -> Result<CheckReport> {
    let (shards, missing) = resolve_shards_lenient(specs)?;
    let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
    let scans: Vec<Mutex<Option<ShardScan>>> = shards.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads.min(shards.len()).max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(path) = shards.get(i) else { return };
                let scan = scan_shard(path, fields);
                let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                if progress {
                    eprintln!(
                        "checked {finished}/{} shards: {} ({} samples, {} bad{})",
                        shards.len(),
                        path.display(),
                        scan.samples,
                        scan.bad,
                        if scan.damage.is_some() { ", damaged" } else { "" }
                    );
                }
                *scans[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(scan);
            });
        }
    });

    let mut report = CheckReport { shards: shards.len(), damaged_shards: missing.len(), ..CheckReport::default() };
    let mut errors: Vec<String> = missing.iter().map(Error::to_string).collect();
    let mut bad_messages = Vec::new();
    for slot in scans {
        let scan = slot.into_inner().unwrap_or_else(|e| e.into_inner()).unwrap_or_default();
        report.samples += scan.samples;
        report.bad += scan.bad;
        report.bytes += scan.bytes;
        if let Some(damage) = scan.damage {
            report.damaged_shards += 1;
            errors.push(damage);
        }
        bad_messages.extend(scan.bad_messages);
        for (size, n) in scan.image_sizes {
            *report.image_sizes.entry(size).or_default() += n;
        }
        for (size, n) in scan.control_sizes {
            *report.control_sizes.entry(size).or_default() += n;
        }
    }
    errors.extend(bad_messages);
    // Every damaged or missing shard and every bad sample is one problem; the list shows the first ones.
    let total_problems = report.damaged_shards as u64 + report.bad;
    errors.truncate(MAX_ERRORS);
    report.errors_omitted = (total_problems - errors.len() as u64) as usize;
    report.errors = errors;
    Ok(report)
}

fn scan_shard(path: &PathBuf, fields: &Fields) -> ShardScan {
    let mut scan = ShardScan::default();
    let name: Arc<str> = Arc::from(path.display().to_string());
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            scan.damage = Some(format!("{name}: cannot open: {e}"));
            return scan;
        }
    };
    let want = fields.clone();
    let mut reader = SampleReader::new(
        BufReader::with_capacity(1 << 16, file),
        name.clone(),
        Arc::new(move |e: &str| want.wants(e)),
    );
    for item in reader.by_ref() {
        match item {
            ShardItem::Sample(raw) => match decode_sample(&raw, fields) {
                Ok(decoded) => {
                    scan.samples += 1;
                    let size = |img: &image::RgbImage| format!("{}x{}", img.width(), img.height());
                    *scan.image_sizes.entry(size(&decoded.image)).or_default() += 1;
                    *scan.control_sizes.entry(size(&decoded.control)).or_default() += 1;
                    recycle_image(decoded.image);
                    recycle_image(decoded.control);
                }
                Err(reason) => {
                    scan.bad += 1;
                    if scan.bad_messages.len() < MAX_ERRORS {
                        scan.bad_messages.push(bad_message(&raw, &reason));
                    }
                }
            },
            ShardItem::Damaged(err) => scan.damage = Some(format!("{name}: {err}")),
        }
    }
    scan.bytes = reader.offset();
    scan
}
