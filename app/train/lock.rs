//! One run per folder at a time: an exclusive lock on `DIR/zeroconv.lock`, held for the run's life.
//!
//! The lock is an OS file lock (`File::try_lock`: `flock` on Linux), so the kernel releases it when the holder
//! exits in any way, `kill -9` included; [`RunLock`]'s `Drop` also releases it on errors and panics. The file
//! names its holder (pid, host, start time) so a refused run can say who holds the folder. A lock file left by a
//! process that died is stale: its OS lock is gone, the next run takes it over and says whose it was.
//!
//! On a filesystem without file locks (`try_lock` answers `Unsupported`) the file itself is the lock, created
//! exclusively; a lock file that names a dead process on this host is stale and removed, one from another host
//! cannot be checked and is refused (delete it by hand once that run is over).

use crate::error::{Error, Result};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The lock file's name inside the run folder.
pub const LOCK_FILE: &str = "zeroconv.lock";

/// The process a lock file names.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    /// When it took the lock, in seconds since the Unix epoch.
    pub since: u64,
}

impl Holder {
    /// This process, now.
    pub fn this_process() -> Holder {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Holder { pid: std::process::id(), host: hostname(), since }
    }

    /// Whether the holder is known to be gone: a process of this host that no longer exists. A process on
    /// another host, or a pid this host cannot check, counts as alive.
    pub fn is_dead(&self) -> bool {
        self.host == hostname() && pid_alive(self.pid) == Some(false)
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on host {} since {}", self.pid, self.host, utc_time(self.since))
    }
}

/// The exclusive lock of a run folder. Dropping it releases the lock and removes the lock file.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    file: Option<File>,
    /// The OS lock is held on `file` (false: the exclusive file itself is the lock).
    os_lock: bool,
    /// The holder a stale lock file named when this run took it over.
    pub took_over: Option<Holder>,
}

impl RunLock {
    /// Takes `dir`'s lock (the folder must exist), or fails naming the run that holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let path = dir.join(LOCK_FILE);
        let me = Holder::this_process();
        // A few attempts: the lock file can be removed by its holder between our open and our lock.
        for _ in 0..20 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::file(&path, format!("cannot open the run folder's lock file: {e}")))?;
            match file.try_lock() {
                Ok(()) => {
                    if !same_file(&file, &path) {
                        // Its holder released and removed it after we opened it: lock the new one.
                        continue;
                    }
                    let mut lock = RunLock { path: path.clone(), file: Some(file), os_lock: true, took_over: None };
                    let file = lock.file.as_mut().expect("just set");
                    lock.took_over = read_holder(file).filter(|h| *h != me);
                    write_holder(file, &me)
                        .map_err(|e| Error::file(&path, format!("cannot write the lock file: {e}")))?;
                    return Ok(lock);
                }
                Err(TryLockError::WouldBlock) => {
                    let mut file = file;
                    // The holder may have locked the file but not written its name yet.
                    let mut holder = read_holder(&mut file);
                    for _ in 0..10 {
                        if holder.is_some() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                        holder = read_holder(&mut file);
                    }
                    return Err(in_use(dir, &path, holder.as_ref()));
                }
                Err(TryLockError::Error(e)) if e.kind() == ErrorKind::Unsupported => {
                    drop(file);
                    return Self::acquire_without_os_locks(dir, &path, me);
                }
                Err(TryLockError::Error(e)) => {
                    return Err(Error::file(&path, format!("cannot lock the run folder: {e}")));
                }
            }
        }
        Err(Error::file(&path, "cannot lock the run folder: its lock file keeps being replaced"))
    }

    /// The lock file itself as the lock (no OS file locks on this filesystem).
    fn acquire_without_os_locks(dir: &Path, path: &Path, me: Holder) -> Result<RunLock> {
        // The empty file an attempt above may have created names nobody.
        if fs::metadata(path).is_ok_and(|m| m.len() == 0) {
            let _ = fs::remove_file(path);
        }
        let mut took_over = None;
        for _ in 0..3 {
            match OpenOptions::new().read(true).write(true).create_new(true).open(path) {
                Ok(mut file) => {
                    write_holder(&mut file, &me)
                        .map_err(|e| Error::file(path, format!("cannot write the lock file: {e}")))?;
                    return Ok(RunLock { path: path.to_path_buf(), file: Some(file), os_lock: false, took_over });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let holder = File::open(path).ok().and_then(|mut f| read_holder(&mut f));
                    match holder {
                        Some(h) if h.is_dead() => {
                            let _ = fs::remove_file(path);
                            took_over = Some(h);
                        }
                        h => return Err(in_use(dir, path, h.as_ref())),
                    }
                }
                Err(e) => return Err(Error::file(path, format!("cannot create the run folder's lock file: {e}"))),
            }
        }
        Err(Error::file(path, "cannot lock the run folder: its lock file keeps being replaced"))
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            // Removed while still locked, so nobody can lock this file and believe they own the folder; a run
            // that opened it just before sees that the path no longer names it and locks a new one.
            if !self.os_lock || same_file(&file, &self.path) {
                let _ = fs::remove_file(&self.path);
            }
            if self.os_lock {
                let _ = file.unlock();
            }
        }
    }
}

fn in_use(dir: &Path, path: &Path, holder: Option<&Holder>) -> Error {
    let who = holder.map_or_else(|| "another process (it has not written its name yet)".to_string(), |h| h.to_string());
    let stale = if holder.is_some_and(|h| h.host != hostname()) {
        format!(" If that run is over and {} is stale, delete it.", path.display())
    } else {
        String::new()
    };
    Error::file(
        dir,
        format!(
            "this run folder is in use by another zeroconv run ({who}; lock file {}). Wait for it to finish, \
             or choose another --out.{stale}",
            path.display()
        ),
    )
}

fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.trim()).ok()
}

fn write_holder(file: &mut File, holder: &Holder) -> std::io::Result<()> {
    let text = serde_json::to_string(holder).map_err(std::io::Error::other)?;
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(format!("{text}\n").as_bytes())?;
    file.sync_all()
}

/// Whether `path` still names the open `file` (not removed or replaced since it was opened).
#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}

/// This machine's name (for lock files), or `unknown-host`.
pub fn hostname() -> String {
    let from_file = |p: &str| fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    from_file("/proc/sys/kernel/hostname")
        .or_else(|| from_file("/etc/hostname"))
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| std::env::var("COMPUTERNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown-host".to_string())
}

/// Whether a process of this host exists; `None` where this cannot be told (no `/proc`).
fn pid_alive(pid: u32) -> Option<bool> {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return None;
    }
    Some(proc.join(pid.to_string()).exists())
}

/// `2026-05-01 12:34:56 UTC` from seconds since the Unix epoch.
pub fn utc_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_time(1_777_638_896), "2026-05-01 12:34:56 UTC");
    }
}
