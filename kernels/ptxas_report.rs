//! Reads the resource report `ptxas -v` prints: registers, stack, spills and shared memory per kernel.
//!
//! Plain std-only Rust, shared by `build.rs` (which includes this file by path to print build warnings) and the
//! library (which exposes it next to the embedded reports).

/// What ptxas allocated for one entry function on one architecture.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    /// The target, e.g. `sm_90`.
    pub arch: String,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    /// Static shared memory.
    pub shared_bytes: u32,
}

impl KernelResources {
    pub fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// Every entry function in a `ptxas -v` report, in report order. Lines it does not know are ignored, so
/// informational lines added by newer ptxas versions do not break it.
pub fn parse(report: &str) -> Vec<KernelResources> {
    let mut kernels: Vec<KernelResources> = Vec::new();
    // The name whose "Function properties" block we are in: stack and spill lines belong to it, and only count
    // when it is the entry being compiled (non-inlined device functions get blocks of their own).
    let mut properties_of: Option<String> = None;
    for line in report.lines() {
        let line = line.trim();
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let name = parts.next().unwrap_or_default().to_string();
            let arch = parts.nth(1).unwrap_or_default().to_string();
            kernels.push(KernelResources { name, arch, ..Default::default() });
            properties_of = None;
        } else if let Some(name) = line.split("Function properties for ").nth(1) {
            properties_of = Some(name.trim().to_string());
        } else if line.contains("bytes stack frame") {
            if let Some(k) = kernels.last_mut().filter(|k| properties_of.as_deref() == Some(k.name.as_str())) {
                k.stack_bytes = number_before(line, " bytes stack frame").unwrap_or(0);
                k.spill_store_bytes = number_before(line, " bytes spill stores").unwrap_or(0);
                k.spill_load_bytes = number_before(line, " bytes spill loads").unwrap_or(0);
            }
        } else if line.contains("Used ") && line.contains(" registers") {
            if let Some(k) = kernels.last_mut() {
                k.registers = number_before(line, " registers").unwrap_or(0);
                k.shared_bytes = number_before(line, " bytes smem").unwrap_or(0);
            }
        }
    }
    kernels
}

/// The decimal number that ends right before `marker` in `line`.
fn number_before(line: &str, marker: &str) -> Option<u32> {
    let head = &line[..line.find(marker)?];
    let digits_start = head.rfind(|c: char| !c.is_ascii_digit()).map_or(0, |i| i + 1);
    head[digits_start..].parse().ok()
}

/// One line per kernel: name, registers, stack, spills, shared memory.
pub fn format_table(kernels: &[KernelResources]) -> String {
    let width = kernels.iter().map(|k| k.name.len()).max().unwrap_or(6).max(6);
    let mut out = format!(
        "{:<width$}  {:>6}  {:>4}  {:>5}  {:>8}  {:>8}  {:>6}\n",
        "kernel", "arch", "regs", "stack", "spill-st", "spill-ld", "smem"
    );
    for k in kernels {
        out.push_str(&format!(
            "{:<width$}  {:>6}  {:>4}  {:>5}  {:>8}  {:>8}  {:>6}\n",
            k.name, k.arch, k.registers, k.stack_bytes, k.spill_store_bytes, k.spill_load_bytes, k.shared_bytes
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shape of ptxas 12.8 output, including a called device function's own properties block, which must not
    // be attributed to the entry being compiled.
    const SAMPLE: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'big_kernel' for 'sm_90'
ptxas info    : Function properties for helper
    16 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Function properties for big_kernel
    8 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4224 bytes smem
ptxas info    : Compile time = 1.234 ms
ptxas info    : Compiling entry function 'small_kernel' for 'sm_90'
ptxas info    : Function properties for small_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 11 registers, used 0 barriers
";

    #[test]
    fn parses_registers_spills_and_shared_memory_per_entry() {
        let kernels = parse(SAMPLE);
        assert_eq!(kernels.len(), 2);
        let big = &kernels[0];
        assert_eq!((big.name.as_str(), big.arch.as_str()), ("big_kernel", "sm_90"));
        assert_eq!((big.registers, big.stack_bytes, big.shared_bytes), (255, 8, 4224));
        assert_eq!((big.spill_store_bytes, big.spill_load_bytes), (12, 20));
        assert!(big.spills());
        let small = &kernels[1];
        assert_eq!((small.name.as_str(), small.registers, small.shared_bytes), ("small_kernel", 11, 0));
        assert!(!small.spills());
    }

    #[test]
    fn text_without_entries_gives_nothing() {
        assert!(parse("").is_empty());
        assert!(parse("kernels were not compiled: NVRTC not found").is_empty());
    }

    #[test]
    fn table_has_a_row_per_kernel() {
        let table = format_table(&parse(SAMPLE));
        assert_eq!(table.lines().count(), 3);
        assert!(table.lines().nth(1).is_some_and(|l| l.starts_with("big_kernel") && l.contains("255")));
    }
}
