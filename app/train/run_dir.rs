//! Run folders (`--out DIR`): one run per folder, and no run touches another run's files.
//!
//! - **One run at a time**: a run holds `DIR/zeroconv.lock` for its whole life ([`super::lock`]); a second run
//!   into the folder is refused, naming the holder.
//! - **A new run never overwrites or deletes another run's files**: a fresh run into a folder that already holds
//!   a run's files (`run.json`, `metrics.jsonl`, `checkpoints/`, exports, sample grids) is refused; `--resume`
//!   continues that run, another `--out` starts a new one. (NeMo's exp_manager would open a `version_N` subfolder
//!   instead, but `--out` is NeMo's `explicit_log_dir`, which NeMo does not version, and the outputs stay at the
//!   paths README and scripts name: `DIR/controlnet.safetensors`, `DIR/base_model.safetensors`.)
//! - **Checkpoints know their run**: a fresh run writes `DIR/run.json` with a new run id; every checkpoint records
//!   it, and the config it was trained with. Pruning (`save_top_k`) deletes only this run's checkpoints, and
//!   `--resume` picks the newest checkpoint of the folder's run (checkpoints of older zeroconv versions, which
//!   record no run, count as the folder's run but are never pruned).
//! - **How a run starts** ([`Start`]): afresh; `--resume` (the folder's run from its newest checkpoint, an error
//!   without one); or NeMo's `exp_manager.resume_if_exists` (the same when the folder holds a checkpoint of its run;
//!   otherwise an error, or with `resume_ignore_no_checkpoint` a fresh run). A fresh run may start from another run's
//!   checkpoint (`exp_manager.resume_from_checkpoint`): its weights, moments, step, RNG and data position, with its
//!   config checked as for a resume; it is a new run, in its own folder.
//! - **Resume hygiene**: `metrics.jsonl` is cut back to the checkpoint's step (the steps after it are trained and
//!   logged again), temporary files that interrupted writes left behind are removed, and a config that differs
//!   from the checkpoint's in anything that changes the computation is refused, listing the differences
//!   ([`super::config_diff`]).

use super::config_diff::{self, CONFIG_KEY};
use super::lock::{hostname, utc_time, RunLock};
use super::state::{self, TrainState};
use crate::error::{Error, Result};
use crate::io::checkpoint::{write_atomically, Checkpoint};
use crate::io::config::Config;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

/// The run's identity, written when a fresh run starts.
pub const RUN_FILE: &str = "run.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CHECKPOINT_DIR: &str = "checkpoints";

/// The files a run writes at the top of its folder (besides `val_step_*.png` and `checkpoints/`).
const RUN_OUTPUTS: &[&str] =
    &[RUN_FILE, METRICS_FILE, "base_model.safetensors", "controlnet.safetensors", "samples.png", "fidelity.json"];

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct RunRecord {
    /// Recorded in every checkpoint of the run.
    run: String,
    started: String,
    host: String,
}

/// A locked run folder and the identity of the run in it. The lock is held until this is dropped.
#[derive(Debug)]
pub struct RunFolder {
    dir: PathBuf,
    lock: RunLock,
    run_id: String,
    config: String,
}

/// What [`open`] hands the training loop.
pub struct Opened {
    pub folder: RunFolder,
    /// The checkpoint to continue from: the folder's own (a resume) or `resume_from_checkpoint`'s.
    pub latest: Option<(Checkpoint, TrainState)>,
    /// `metrics.jsonl`, open for appending.
    pub metrics: File,
    /// Where `latest` came from when it is not this folder's run (`resume_from_checkpoint`).
    pub started_from: Option<PathBuf>,
}

/// How a run starts in its folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new run.
    Fresh,
    /// `--resume`: the folder's run, from its newest checkpoint; an error when it has none.
    Resume,
    /// NeMo's `exp_manager.resume_if_exists`: as `Resume` when the folder holds a checkpoint of its run; otherwise
    /// an error, or with `ignore_no_checkpoint` (`resume_ignore_no_checkpoint`) a new run.
    ResumeIfExists { ignore_no_checkpoint: bool },
}

/// Opens `dir` for a run: creates and locks it, then applies the rules above for a fresh run (`resume` false) or
/// a resumed one.
pub fn open(dir: &Path, cfg: &Config, resume: bool) -> Result<Opened> {
    open_with(dir, cfg, if resume { Start::Resume } else { Start::Fresh }, None)
}

/// [`open`] for every way a run starts. `from` (`exp_manager.resume_from_checkpoint`): when the folder's run is not
/// resumed, the new run continues from that checkpoint (its config checked as for a resume), as NeMo does: a
/// checkpoint of the folder's run found by `resume_if_exists` wins over it.
pub fn open_with(dir: &Path, cfg: &Config, start: Start, from: Option<&Path>) -> Result<Opened> {
    fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create the output directory: {e}")))?;
    let lock = RunLock::acquire(dir)?;
    if let Some(h) = &lock.took_over {
        eprintln!("{}: taking over a stale lock of {h} (that run is gone)", dir.display());
    }
    let config = config_diff::record(cfg)?;
    let resume_here = |lock: RunLock, config: String| {
        if let Some(p) = from {
            eprintln!("exp_manager.resume_from_checkpoint ({}) not used: the folder's run is resumed", p.display());
        }
        open_resumed(dir, cfg, lock, config)
    };
    match start {
        Start::Fresh => {}
        Start::Resume => return resume_here(lock, config),
        Start::ResumeIfExists { ignore_no_checkpoint } => {
            let record = read_run_record(dir)?;
            let ckdir = dir.join(CHECKPOINT_DIR);
            if newest_of_run(&ckdir, &record)?.chosen.is_some() {
                return resume_here(lock, config);
            }
            let none = format!(
                "exp_manager.resume_if_exists: there is no checkpoint of this folder's run in {} to resume from",
                ckdir.display()
            );
            if !ignore_no_checkpoint {
                return Err(Error::msg(format!(
                    "{none} (NeMo stops here too; set exp_manager.resume_ignore_no_checkpoint=True to start a new run \
                     when there is none)"
                )));
            }
            let found = run_files(dir);
            if !found.is_empty() {
                return Err(Error::file(
                    dir,
                    format!(
                        "{none}, and a new run may not start here: the folder holds a run's files ({}), which a new \
                         run never overwrites; choose another --out (or exp_manager.name / explicit_log_dir)",
                        found.join(", ")
                    ),
                ));
            }
            match from {
                Some(p) => eprintln!("{none}; starting from {}", p.display()),
                None => eprintln!("{none}; training from scratch (resume_ignore_no_checkpoint)"),
            }
        }
    }
    // Checked before the new run writes anything, so a refused checkpoint leaves the folder as it was.
    let start_from = match from {
        Some(path) => {
            let refer = |e: Error| Error::msg(format!("exp_manager.resume_from_checkpoint: {e}"));
            let (ck, st) = state::load(path).map_err(refer)?;
            check_config(&ck, path, cfg).map_err(refer)?;
            Some((path.to_path_buf(), ck, st))
        }
        None => None,
    };
    let mut opened = open_fresh(dir, lock, config)?;
    if let Some((path, ck, st)) = start_from {
        eprintln!("starting from {} (the {} phase after step {})", path.display(), st.phase, st.step);
        opened.latest = Some((ck, st));
        opened.started_from = Some(path);
    }
    Ok(opened)
}

fn open_fresh(dir: &Path, lock: RunLock, config: String) -> Result<Opened> {
    let found = run_files(dir);
    if !found.is_empty() {
        return Err(Error::file(
            dir,
            format!(
                "already holds a run's files ({}): pass --resume to continue that run, or choose another --out for \
                 a new run (a new run never overwrites or deletes another run's files)",
                found.join(", ")
            ),
        ));
    }
    remove_leftover_temp_files(dir);
    let run_id = new_run_id();
    write_run_record(dir, &run_id)?;
    let path = dir.join(METRICS_FILE);
    let metrics =
        OpenOptions::new().create_new(true).append(true).open(&path).map_err(|e| Error::file(&path, e.to_string()))?;
    Ok(Opened {
        folder: RunFolder { dir: dir.to_path_buf(), lock, run_id, config },
        latest: None,
        metrics,
        started_from: None,
    })
}

/// The newest checkpoint of the folder's run in `ckdir`, and the checkpoints of other runs newer than it.
struct Newest {
    chosen: Option<(PathBuf, Checkpoint, TrainState)>,
    foreign: Vec<String>,
    any: bool,
}

fn newest_of_run(ckdir: &Path, record: &Option<RunRecord>) -> Result<Newest> {
    let all = state::list(ckdir);
    let mut foreign = Vec::new();
    for (_, path) in all.iter().rev() {
        let unreadable = |e: Error| {
            Error::msg(format!(
                "--resume: {e} (move the file out of {} to resume from the one before)",
                ckdir.display()
            ))
        };
        let st = state::read_state(path).map_err(unreadable)?;
        let ours = match (record, &st.run) {
            (Some(r), Some(run)) => *run == r.run,
            _ => true,
        };
        if ours {
            let (ck, st) = state::load(path).map_err(unreadable)?;
            return Ok(Newest { chosen: Some((path.clone(), ck, st)), foreign, any: true });
        }
        foreign.push(file_name(path));
    }
    Ok(Newest { chosen: None, foreign, any: !all.is_empty() })
}

fn open_resumed(dir: &Path, cfg: &Config, lock: RunLock, config: String) -> Result<Opened> {
    let record = read_run_record(dir)?;
    let ckdir = dir.join(CHECKPOINT_DIR);
    let Newest { chosen, foreign, any } = newest_of_run(&ckdir, &record)?;
    if !any {
        let before_first = if dir.join(METRICS_FILE).exists() {
            format!(
                " (the run in {} stopped before its first checkpoint: start it afresh with another --out, or delete \
                 the folder)",
                dir.display()
            )
        } else {
            String::new()
        };
        return Err(Error::file(ckdir, format!("--resume: no checkpoint here to resume from{before_first}")));
    }
    // The newest checkpoint of the folder's run; checkpoints of other runs are left alone.
    let Some((path, ck, st)) = chosen else {
        let r = record.as_ref().map_or(String::new(), |r| r.run.clone());
        return Err(Error::file(
            ckdir,
            format!(
                "--resume: no checkpoint of this folder's run (run {r}, in {RUN_FILE}); the checkpoints here belong to \
                 other runs: {}",
                foreign.join(", ")
            ),
        ));
    };
    if !foreign.is_empty() {
        eprintln!("--resume: ignoring checkpoints of other runs in {}: {}", ckdir.display(), foreign.join(", "));
    }
    check_config(&ck, &path, cfg)?;
    let run_id = match (&record, &st.run) {
        (Some(r), _) => r.run.clone(),
        (None, Some(run)) => run.clone(),
        (None, None) => new_run_id(),
    };
    if record.is_none() {
        write_run_record(dir, &run_id)?;
    }
    let metrics_path = dir.join(METRICS_FILE);
    let cut = cut_metrics(&metrics_path, &st.phase, st.step)?;
    if cut > 0 {
        eprintln!("{METRICS_FILE}: removed {cut} line(s) logged after the checkpoint (those steps are trained again)");
    }
    let removed = remove_leftover_temp_files(dir);
    if removed > 0 {
        eprintln!("removed {removed} temporary file(s) left by interrupted writes");
    }
    let metrics = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::file(&metrics_path, e.to_string()))?;
    Ok(Opened {
        folder: RunFolder { dir: dir.to_path_buf(), lock, run_id, config },
        latest: Some((ck, st)),
        metrics,
        started_from: None,
    })
}

/// Refuses a resume whose config changes the computation; notes the allowed changes.
fn check_config(ck: &Checkpoint, path: &Path, cfg: &Config) -> Result<()> {
    let Some(recorded) = ck.metadata().get(CONFIG_KEY) else {
        eprintln!(
            "--resume: {} was written by an older zeroconv and records no config; the config is not checked against it",
            path.display()
        );
        return Ok(());
    };
    let cmp = config_diff::compare(recorded, cfg)?;
    if !cmp.refused.is_empty() {
        let list: Vec<String> = cmp.refused.iter().map(|c| format!("  {c}")).collect();
        return Err(Error::msg(format!(
            "--resume: the config differs from the one {} was trained with, in settings that change the computation:\n\
             {}\nresume with the checkpoint's values (only model.optim.lr, model.optim.sched.*, trainer.max_steps and \
             trainer.max_epochs may change), or start a new run with another --out",
            path.display(),
            list.join("\n")
        )));
    }
    for c in &cmp.allowed {
        eprintln!("--resume: {c}");
    }
    Ok(())
}

impl RunFolder {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The id every checkpoint of this run records.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The config (JSON) checkpoints record.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// The lock file held.
    pub fn lock_path(&self) -> &Path {
        self.lock.path()
    }

    /// Keeps the newest `save_top_k` checkpoints of this run (`None`: all; 0 keeps the newest one) and deletes
    /// its older ones. Files of other runs, and files that are not checkpoints, are never touched.
    pub fn prune(&self, save_top_k: Option<u32>) {
        let Some(keep) = save_top_k else { return };
        let keep = keep.max(1) as usize;
        let mut ours = 0;
        for (_, path) in state::list(&self.dir.join(CHECKPOINT_DIR)).iter().rev() {
            let Ok(st) = state::read_state(path) else { continue };
            if st.run.as_deref() != Some(self.run_id.as_str()) {
                continue;
            }
            ours += 1;
            if ours > keep {
                let _ = fs::remove_file(path);
            }
        }
    }
}

/// The run files in `dir` that make it another run's folder (empty: a fresh run may start here).
pub fn run_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        let mut names: Vec<String> =
            rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into()).collect();
        names.sort();
        for name in names {
            if RUN_OUTPUTS.contains(&name.as_str()) || is_val_grid(&name) {
                found.push(name);
            }
        }
    }
    let ckdir = dir.join(CHECKPOINT_DIR);
    if let Ok(rd) = fs::read_dir(&ckdir) {
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into())
            .filter(|n: &String| temp_target(n).is_none())
            .collect();
        names.sort();
        if let Some(first) = names.first() {
            let more = if names.len() > 1 { format!(" and {} more", names.len() - 1) } else { String::new() };
            found.push(format!("{CHECKPOINT_DIR}/{first}{more}"));
        }
    }
    found
}

fn is_val_grid(name: &str) -> bool {
    name.starts_with("val_step_") && name.ends_with(".png")
}

/// The file a temporary file of [`write_atomically`] was to become (`.NAME.tmp-PID-N` → NAME).
fn temp_target(name: &str) -> Option<&str> {
    let (target, tail) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    let (pid, n) = tail.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(n) && !target.is_empty()).then_some(target)
}

/// Removes the temporary files that interrupted writes of a run left in `dir` and `dir/checkpoints` (only those
/// of files a run writes); returns how many. Called with the folder locked, so no writer is alive.
pub fn remove_leftover_temp_files(dir: &Path) -> usize {
    let mut removed = 0;
    let top = |t: &str| RUN_OUTPUTS.contains(&t) || is_val_grid(t);
    let ckpt = |t: &str| t.starts_with("step_") && t.ends_with(".safetensors");
    for (folder, ours) in [(dir.to_path_buf(), &top as &dyn Fn(&str) -> bool), (dir.join(CHECKPOINT_DIR), &ckpt)] {
        let Ok(rd) = fs::read_dir(&folder) else { continue };
        for entry in rd.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().to_string();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if is_file && temp_target(&name).is_some_and(ours) && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// Keeps the lines of `metrics.jsonl` logged up to (`phase`, `step`) and drops the rest: lines of steps after it
/// (logged before an interruption; the resumed run logs them again) and broken lines. Returns how many went.
pub fn cut_metrics(path: &Path, phase: &str, step: u64) -> Result<usize> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::file(path, e.to_string())),
    };
    let rank = |p: &str| u8::from(p != "base");
    let limit = (rank(phase), step);
    let mut kept = Vec::with_capacity(text.len());
    let mut dropped = 0;
    for line in text.split_inclusive(|&b| b == b'\n') {
        let within = line.ends_with(b"\n")
            && serde_json::from_slice::<serde_json::Value>(line).ok().is_some_and(|v| {
                let p = v.get("phase").and_then(|p| p.as_str()).unwrap_or("control");
                v.get("step").and_then(|s| s.as_u64()).is_some_and(|s| (rank(p), s) <= limit)
            });
        if within {
            kept.extend_from_slice(line);
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        write_atomically(path, |w| w.write_all(&kept).map_err(|e| Error::msg(e.to_string())))?;
    }
    Ok(dropped)
}

fn read_run_record(dir: &Path) -> Result<Option<RunRecord>> {
    let path = dir.join(RUN_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::file(&path, format!("is not a zeroconv run record: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::file(&path, e.to_string())),
    }
}

fn write_run_record(dir: &Path, run: &str) -> Result<()> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let rec = RunRecord { run: run.to_string(), started: utc_time(secs), host: hostname() };
    let text = serde_json::to_string_pretty(&rec).map_err(|e| Error::msg(e.to_string()))? + "\n";
    write_atomically(&dir.join(RUN_FILE), |w| w.write_all(text.as_bytes()).map_err(|e| Error::msg(e.to_string())))
}

/// A new run id: the start time and 64 random bits.
fn new_run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(now.as_nanos());
    format!("{}-{:016x}", now.as_secs(), h.finish())
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_file_names() {
        assert_eq!(temp_target(".step_10000003.safetensors.tmp-123-0"), Some("step_10000003.safetensors"));
        assert_eq!(temp_target(".controlnet.safetensors.tmp-9-12"), Some("controlnet.safetensors"));
        assert_eq!(temp_target(".notes.tmp"), None);
        assert_eq!(temp_target("step_1.safetensors.tmp-1-2"), None);
        assert_eq!(temp_target(".x.tmp-1-"), None);
    }
}
