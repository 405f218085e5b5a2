//! How much host memory a request may take: checked before a large allocation, so a request larger than memory is
//! one clear error instead of an abort in the allocator (or the OOM killer).

use crate::error::{Error, Result};

/// The memory the OS says is available for a new allocation (Linux: MemAvailable), where it says.
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// Refuses `bytes` for `what` when the OS reports less available memory, naming both figures and `hint`.
pub fn ensure_available(bytes: u64, what: &str, hint: &str) -> Result<()> {
    match available_bytes() {
        Some(available) if bytes > available => Err(Error::msg(format!(
            "{what} needs {:.2} GiB but only {:.2} GiB of memory is available; {hint}",
            bytes as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        ))),
        _ => Ok(()),
    }
}

/// A byte count the way a person reads it: "812 B", "12.5 KiB", "1.2 MiB", "8.0 GiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_the_unit() {
        assert_eq!(human_bytes(812), "812 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1_258_291), "1.2 MiB");
        assert_eq!(human_bytes(8 << 30), "8.0 GiB");
    }
}
