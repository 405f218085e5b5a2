//! Fuzz targets for every input parser (issue 17): the safetensors header, the pickle VM, the zip directory of
//! torch.save checkpoints, the WebDataset tar reader, the YAML config layer and the override parser.
//!
//! Each target is a proptest property run from a fixed ChaCha seed (so CI never flakes and a failure reproduces)
//! for a bounded number of cases and a wall-clock budget. Inputs are mostly mutations of small valid seeds (built
//! here with the project's own writers, or the committed fixtures): bit flips, overwritten bytes, truncations,
//! inserted, duplicated and deleted chunks, huge length fields and format-specific tokens. The property: the parser
//! never panics, never hangs (a watchdog fails the test, naming the input), never makes one allocation or holds a
//! peak above a bound (a counting allocator), and either parses or returns an error with a message.
//!
//! No failure is persisted anywhere (`failure_persistence: None`); a finding is kept as a regression test below.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use zeroconv::engine::HostTensor;
use zeroconv::graph::DType;
use zeroconv::io::checkpoint::{write_safetensors, Checkpoint};
use zeroconv::io::config::{Config, TINY_YAML};
use zeroconv::io::data::tar::{TarReader, TarWriter};

// ---------------------------------------------------------------------------------------------------------------
// Allocation accounting: per thread, only while a case runs (other tests in this binary run on other threads).

/// The largest single allocation a parser may make for these small inputs (the tar reader preallocates up to
/// 64 MiB for a member whose header claims more: bounded, so allowed).
const MAX_ONE_ALLOCATION: usize = 96 << 20;
/// The most a case may hold at once.
const MAX_PEAK: usize = 192 << 20;
/// Above this a request is refused outright (the process aborts with "memory allocation failed") rather than
/// letting an unbounded allocation take the machine's memory.
const REFUSE_ABOVE: usize = 2 << 30;

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) -> bool {
    ARMED.with(|armed| {
        if !armed.get() {
            return true;
        }
        if size > REFUSE_ABOVE {
            return false;
        }
        let live = LIVE.with(|l| {
            let v = l.get().saturating_add(size);
            l.set(v);
            v
        });
        PEAK.with(|p| p.set(p.get().max(live)));
        LARGEST.with(|m| m.set(m.get().max(size)));
        true
    })
}

fn note_free(size: usize) {
    if ARMED.with(Cell::get) {
        LIVE.with(|l| l.set(l.get().saturating_sub(size)));
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the bookkeeping only touches const-initialised
// thread-local `Cell`s, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !note_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !note_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: `ptr` came from this allocator (i.e. `System`) with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !note_alloc(new_size) {
            return std::ptr::null_mut();
        }
        note_free(layout.size());
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` with this thread's allocations counted; fails when one allocation or the peak is above the bounds.
fn bounded_alloc<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    LARGEST.with(|m| m.set(0));
    ARMED.with(|a| a.set(true));
    let out = f();
    ARMED.with(|a| a.set(false));
    let (peak, largest) = (PEAK.with(Cell::get), LARGEST.with(Cell::get));
    if largest > MAX_ONE_ALLOCATION || peak > MAX_PEAK {
        return Err(format!("allocated {largest} bytes at once, {peak} bytes at the peak"));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------------
// Mutations of seed inputs.

#[derive(Clone, Debug)]
enum Pos {
    /// Anywhere in the input.
    Any(Index),
    /// Within the last 256 bytes (a zip's central directory, a tar's end blocks).
    Tail(u8),
}

impl Pos {
    /// A position in `0..=len`.
    fn at(&self, len: usize) -> usize {
        match self {
            Pos::Any(i) => i.index(len + 1),
            Pos::Tail(back) => len.saturating_sub(*back as usize),
        }
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(Pos, u8),
    SetByte(Pos, u8),
    Truncate(Pos),
    Insert(Pos, Vec<u8>),
    /// Copies `len` bytes from the first position to the second.
    Duplicate(Pos, u16, Pos),
    Delete(Pos, u16),
    /// Overwrites with a huge little-endian length (u64/u32 max, 2^31-1, 2^32, 2^62...).
    HugeLen(Pos, u8),
    /// Inserts (or, when `overwrite`, writes over) a format-specific token from the target's dictionary.
    Token(Pos, Index, bool),
}

const HUGE: [u64; 8] = [u64::MAX, u32::MAX as u64, 0x7fff_ffff, 1 << 32, 1 << 62, 0x8000_0000, 100_000_001, 0xffff];

fn pos() -> impl Strategy<Value = Pos> {
    prop_oneof![4 => any::<Index>().prop_map(Pos::Any), 1 => any::<u8>().prop_map(Pos::Tail)]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (pos(), 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
        2 => (pos(), any::<u8>()).prop_map(|(p, b)| Mutation::SetByte(p, b)),
        1 => pos().prop_map(Mutation::Truncate),
        1 => (pos(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, v)| Mutation::Insert(p, v)),
        1 => (pos(), 1u16..600, pos()).prop_map(|(a, n, b)| Mutation::Duplicate(a, n, b)),
        1 => (pos(), 1u16..600).prop_map(|(p, n)| Mutation::Delete(p, n)),
        2 => (pos(), any::<u8>()).prop_map(|(p, w)| Mutation::HugeLen(p, w)),
        3 => (pos(), any::<Index>(), any::<bool>()).prop_map(|(p, t, o)| Mutation::Token(p, t, o)),
    ]
}

fn apply(data: &mut Vec<u8>, m: &Mutation, tokens: &[&[u8]]) {
    let len = data.len();
    match m {
        Mutation::FlipBit(p, bit) => {
            if len > 0 {
                let i = p.at(len - 1);
                data[i] ^= 1 << bit;
            }
        }
        Mutation::SetByte(p, b) => {
            if len > 0 {
                let i = p.at(len - 1);
                data[i] = *b;
            }
        }
        Mutation::Truncate(p) => data.truncate(p.at(len)),
        Mutation::Insert(p, bytes) => {
            let i = p.at(len);
            data.splice(i..i, bytes.iter().copied());
        }
        Mutation::Duplicate(from, n, to) => {
            let a = from.at(len);
            let chunk: Vec<u8> = data[a..(a + *n as usize).min(len)].to_vec();
            let b = to.at(len);
            data.splice(b..b, chunk);
        }
        Mutation::Delete(p, n) => {
            let a = p.at(len);
            data.drain(a..(a + *n as usize).min(len));
        }
        Mutation::HugeLen(p, which) => {
            let value = HUGE[*which as usize % HUGE.len()];
            let bytes: Vec<u8> =
                if which & 0x80 != 0 { (value as u32).to_le_bytes().to_vec() } else { value.to_le_bytes().to_vec() };
            let i = p.at(len);
            let end = (i + bytes.len()).min(len);
            data.splice(i..end, bytes);
        }
        Mutation::Token(p, t, overwrite) => {
            if tokens.is_empty() {
                return;
            }
            let token = tokens[t.index(tokens.len())];
            let i = p.at(len);
            let end = if *overwrite { (i + token.len()).min(len) } else { i };
            data.splice(i..end, token.iter().copied());
        }
    }
}

/// A fuzz input: a seed and the mutations applied to it, or (seed index `None`) arbitrary bytes.
#[derive(Clone, Debug)]
struct Input {
    seed: Option<usize>,
    mutations: Vec<Mutation>,
    raw: Vec<u8>,
    /// Target-specific switch (safetensors: fix the length field; tar: fix header checksums).
    fix: bool,
}

impl Input {
    fn bytes(&self, seeds: &[Vec<u8>], tokens: &[&[u8]]) -> Vec<u8> {
        let Some(s) = self.seed else { return self.raw.clone() };
        let mut data = seeds[s].clone();
        for m in &self.mutations {
            apply(&mut data, m, tokens);
        }
        data
    }
}

fn input(n_seeds: usize, max_mutations: usize) -> impl Strategy<Value = Input> {
    prop_oneof![
        8 => (0..n_seeds, prop::collection::vec(mutation(), 1..=max_mutations), any::<bool>())
            .prop_map(|(s, mutations, fix)| Input { seed: Some(s), mutations, raw: Vec::new(), fix }),
        1 => prop::collection::vec(any::<u8>(), 0..1024)
            .prop_map(|raw| Input { seed: None, mutations: Vec::new(), raw, fix: false }),
    ]
}

// ---------------------------------------------------------------------------------------------------------------
// The runner: fixed seed, case count, wall-clock budget, watchdog.

/// A case slower than this is a finding (a near-hang: quadratic behaviour or a loop that ends only by luck).
const SLOW_CASE: Duration = Duration::from_secs(10);
/// How long the watchdog waits past a target's budget before declaring a hang.
const HANG_GRACE: Duration = Duration::from_secs(60);

/// Runs `check` on `cases` inputs drawn from `strategy` with a fixed ChaCha seed. Cases after `budget` has passed
/// are skipped (counted, not run), so a slow machine shortens the run instead of failing it. A case that panics,
/// allocates past the bounds, takes longer than `SLOW_CASE` or returns `Err` fails the test with the (shrunk) input;
/// one that never returns fails it after the budget plus `HANG_GRACE`, with the input it was running.
fn fuzz<S>(name: &'static str, cases: u32, budget: Duration, strategy: S, check: fn(&S::Value) -> Result<(), String>)
where
    S: Strategy + Send + 'static,
    S::Value: Send + 'static,
{
    let current: Arc<Mutex<String>> = Arc::default();
    let (done_tx, done_rx) = mpsc::channel();
    let shared = current.clone();
    let worker = std::thread::Builder::new()
        .name(format!("fuzz-{name}"))
        .spawn(move || {
            let config = PtConfig {
                cases,
                failure_persistence: None,
                max_shrink_iters: 256,
                max_shrink_time: 20_000,
                ..PtConfig::default()
            };
            let mut seed = [0u8; 32];
            seed[..name.len().min(32)].copy_from_slice(&name.as_bytes()[..name.len().min(32)]);
            let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
            let mut runner = TestRunner::new_with_rng(config, rng);
            let start = Instant::now();
            let (ran, skipped) = (Cell::new(0u32), Cell::new(0u32));
            let result = runner.run(&strategy, |value| {
                if start.elapsed() > budget {
                    skipped.set(skipped.get() + 1);
                    return Ok(());
                }
                ran.set(ran.get() + 1);
                *shared.lock().unwrap_or_else(|e| e.into_inner()) = format!("{value:?}");
                let t = Instant::now();
                let outcome = bounded_alloc(|| check(&value));
                let took = t.elapsed();
                if took > SLOW_CASE {
                    return Err(TestCaseError::fail(format!("{name}: one case took {took:?}")));
                }
                match outcome {
                    Err(alloc) => Err(TestCaseError::fail(format!("{name}: {alloc}"))),
                    Ok(Err(msg)) => Err(TestCaseError::fail(format!("{name}: {msg}"))),
                    Ok(Ok(())) => Ok(()),
                }
            });
            eprintln!(
                "fuzz {name}: {} cases run, {} skipped (budget), {:.1?}",
                ran.get(),
                skipped.get(),
                start.elapsed()
            );
            let _ = done_tx.send(result.map_err(|e| e.to_string()));
        })
        .expect("spawn the fuzz worker");
    match done_rx.recv_timeout(budget + HANG_GRACE) {
        Ok(Ok(())) => {
            let _ = worker.join();
        }
        Ok(Err(failure)) => panic!("fuzz target {name} found a failure:\n{failure}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The worker panicked outside a case (a bug in this file).
            let _ = worker.join();
            panic!("fuzz target {name}: the runner died");
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let last = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
            panic!("fuzz target {name} hangs; the input it is running:\n{last}");
        }
    }
}

/// Per-target budget: the six targets run in parallel on CI's two cores, so the file takes about this long.
const BUDGET: Duration = Duration::from_secs(20);

/// An error's message must say something.
fn check_message(what: &str, msg: String) -> Result<(), String> {
    if msg.trim().is_empty() {
        return Err(format!("{what}: an error with an empty message"));
    }
    Ok(())
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

thread_local! {
    /// The per-thread temporary folder inputs are written to where the parser needs a path.
    static SCRATCH: tempfile::TempDir =
        tempfile::Builder::new().prefix("zeroconv-fuzz").tempdir().expect("temporary folder");
}

/// Writes `bytes` to `name` in this thread's temporary folder and opens it as a checkpoint; on success reads every
/// tensor (the ranges `open` validated must all be readable).
fn open_checkpoint(name: &str, bytes: &[u8]) -> Result<(), String> {
    let path = SCRATCH.with(|d| d.path().join(name));
    std::fs::write(&path, bytes).map_err(|e| format!("writing the input: {e}"))?;
    match Checkpoint::open(&path) {
        Ok(ckpt) => {
            let keys: Vec<String> = ckpt.keys().map(str::to_string).collect();
            for key in keys {
                if let Err(e) = ckpt.to_f32(&key) {
                    check_message("to_f32", e.to_string())?;
                }
            }
            Ok(())
        }
        Err(e) => check_message("Checkpoint::open", e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// safetensors header

fn safetensors_seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().expect("temporary folder");
    let path = dir.path().join("seed.safetensors");
    let tensors = vec![
        ("a.weight".to_string(), HostTensor::from_f64(vec![2, 3], DType::F32, &[0.5; 6]).expect("tensor")),
        ("a.bias".to_string(), HostTensor::from_f64(vec![3], DType::F16, &[1.0; 3]).expect("tensor")),
        ("scalar".to_string(), HostTensor::from_f64(vec![], DType::BF16, &[2.0]).expect("tensor")),
        ("steps".to_string(), HostTensor::from_f64(vec![1], DType::I64, &[7.0]).expect("tensor")),
    ];
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&path, &tensors, Some(&meta)).expect("write the seed");
    vec![std::fs::read(&path).expect("read the seed"), read_fixture("checkpoint/tiny.safetensors")]
}

const JSON_TOKENS: &[&[u8]] = &[
    b"\"dtype\":\"F32\"",
    b"\"dtype\":\"U8\"",
    b"\"dtype\":\"Q4\"",
    b"\"shape\":[]",
    b"\"shape\":[18446744073709551615,2]",
    b"\"shape\":[4294967296,4294967296]",
    b"\"shape\":[-1]",
    b"\"data_offsets\":[0,0]",
    b"\"data_offsets\":[0,18446744073709551615]",
    b"\"data_offsets\":[8,4]",
    b"\"__metadata__\":{\"k\":1}",
    b"\"x\":{},",
    b"1e999",
    b"[[[[[[[[[[[[[[[[",
    b"null",
    b"\"\\ud800\"",
];

/// Values written over a header field by the structural edits.
const JSON_VALUES: &[&str] = &[
    "\"F32\"",
    "\"F16\"",
    "\"BOOL\"",
    "\"Q4_K\"",
    "\"\"",
    "[]",
    "[0]",
    "[1,1,1,1,1,1,1,1]",
    "[4294967296,4294967296]",
    "[18446744073709551615]",
    "[18446744073709551615,18446744073709551615]",
    "[3037000500,3037000500]",
    "[-1]",
    "[1.5]",
    "[0,0]",
    "[0,4]",
    "[4,0]",
    "[0,18446744073709551615]",
    "[18446744073709551615,0]",
    "[0,1000000000000]",
    "[0]",
    "[0,1,2]",
    "null",
    "true",
    "0",
    "{}",
    "\"x\"",
    "[[1]]",
    "[\"1\"]",
];

/// A structural edit of the JSON header: (entry, action, value).
type JsonEdit = (Index, u8, Index);

fn edit_header(header: &mut serde_json::Map<String, serde_json::Value>, (entry, action, value): &JsonEdit) {
    let keys: Vec<String> = header.keys().cloned().collect();
    if keys.is_empty() {
        return;
    }
    let key = keys[entry.index(keys.len())].clone();
    let value: serde_json::Value = serde_json::from_str(JSON_VALUES[value.index(JSON_VALUES.len())]).expect("json");
    match action % 7 {
        0..=2 => {
            let field = ["dtype", "shape", "data_offsets"][(action % 7) as usize];
            if let Some(serde_json::Value::Object(t)) = header.get_mut(&key) {
                t.insert(field.to_string(), value);
            } else {
                header.insert(key, value);
            }
        }
        3 => {
            if let Some(serde_json::Value::Object(t)) = header.get_mut(&key) {
                let fields: Vec<String> = t.keys().cloned().collect();
                if !fields.is_empty() {
                    t.remove(&fields[entry.index(fields.len())]);
                }
            }
        }
        4 => {
            // Another tensor over the same bytes (an overlap), or an alias of the metadata.
            let copy = header[&key].clone();
            header.insert(format!("{key}.copy"), copy);
        }
        5 => {
            header.insert(key, value);
        }
        _ => {
            header.insert("__metadata__".to_string(), value);
        }
    }
}

fn safetensors_case(case: &(Input, Vec<JsonEdit>)) -> Result<(), String> {
    thread_local!(static SEEDS: Vec<Vec<u8>> = safetensors_seeds());
    let (input, edits) = case;
    let bytes = SEEDS.with(|seeds| match input.seed {
        // Mutate the JSON header only and write the true length, so the mutations reach the field checks: by
        // structural edits when there are some, else by byte mutations.
        Some(s) if input.fix || !edits.is_empty() => {
            let seed = &seeds[s];
            let n = u64::from_le_bytes(seed[..8].try_into().expect("8 bytes")) as usize;
            let mut header = seed[8..8 + n].to_vec();
            if edits.is_empty() {
                for m in &input.mutations {
                    apply(&mut header, m, JSON_TOKENS);
                }
            } else {
                let mut map: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(&header).expect("the seed header is JSON");
                for edit in edits {
                    edit_header(&mut map, edit);
                }
                header = serde_json::to_vec(&map).expect("json");
            }
            let mut out = (header.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&header);
            out.extend_from_slice(&seed[8 + n..]);
            out
        }
        _ => input.bytes(seeds, JSON_TOKENS),
    });
    open_checkpoint("case.safetensors", &bytes)
}

#[test]
fn fuzz_safetensors_header() {
    let edits = prop::collection::vec((any::<Index>(), any::<u8>(), any::<Index>()), 0..4);
    fuzz("safetensors", 10_000, BUDGET, (input(2, 3), edits), safetensors_case);
}

// ---------------------------------------------------------------------------------------------------------------
// torch.save zip: the pickle VM (data.pkl rewritten into a valid zip) and the zip directory (the file mutated)

const CKPT_FIXTURES: &[&str] =
    &["checkpoint/tiny.ckpt", "checkpoint/tiny_proto4.ckpt", "checkpoint/lightning.ckpt", "checkpoint/nested.pth"];

/// A zip's records (name, bytes), in order.
type ZipRecords = Vec<(String, Vec<u8>)>;

/// The records of a stored zip, in order.
fn zip_records(bytes: &[u8]) -> ZipRecords {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).expect("fixture zip");
    (0..archive.len())
        .map(|i| {
            let mut file = archive.by_index(i).expect("fixture record");
            let mut data = Vec::new();
            file.read_to_end(&mut data).expect("fixture record bytes");
            (file.name().expect("record name").to_string(), data)
        })
        .collect()
}

fn write_zip(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in records {
        w.start_file(name.as_str(), options).expect("zip record");
        w.write_all(data).expect("zip data");
    }
    w.finish().expect("zip").into_inner()
}

fn pickle_seeds() -> Vec<ZipRecords> {
    CKPT_FIXTURES.iter().map(|f| zip_records(&read_fixture(f))).collect()
}

const PICKLE_TOKENS: &[&[u8]] = &[
    b"(",                                            // MARK
    b"0",                                            // POP
    b"1",                                            // POP_MARK
    b"2",                                            // DUP
    b"R",                                            // REDUCE
    b"b",                                            // BUILD
    b"Q",                                            // BINPERSID
    b"s",                                            // SETITEM
    b"u",                                            // SETITEMS
    b"t",                                            // TUPLE
    b"e",                                            // APPENDS
    b"\x94",                                         // MEMOIZE
    b"h\x00",                                        // BINGET 0
    b"j\xff\xff\xff\xff",                            // LONG_BINGET
    b"r\xff\xff\xff\x7f",                            // LONG_BINPUT
    b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f",     // LONG1 i64::MAX
    b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01", // LONG1, a bigint
    b"J\xff\xff\xff\xff",                            // BININT -1
    b"\x8c\x04cuda",                                 // SHORT_BINUNICODE
    b"X\xff\xff\xff\xff",                            // BINUNICODE, huge
    b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff",         // BINUNICODE8, huge
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch\nFloatStorage\n",
    b"ccollections\nOrderedDict\n",
    b"\x8c\x07storage\x94",
    b"(((((((((((((((((",
    b".", // STOP
];

fn pickle_case(input: &Input) -> Result<(), String> {
    thread_local!(static SEEDS: (Vec<ZipRecords>, Vec<Vec<u8>>) = {
        let zips = pickle_seeds();
        let pkls = zips
            .iter()
            .map(|records| records.iter().find(|(n, _)| n.ends_with("/data.pkl")).expect("data.pkl").1.clone())
            .collect();
        (zips, pkls)
    });
    let bytes = SEEDS.with(|(zips, pkls)| {
        let pkl = input.bytes(pkls, PICKLE_TOKENS);
        let mut records = zips[input.seed.unwrap_or(0)].clone();
        for (name, data) in &mut records {
            if name.ends_with("/data.pkl") {
                *data = pkl.clone();
            }
        }
        write_zip(&records)
    });
    open_checkpoint("case.ckpt", &bytes)
}

#[test]
fn fuzz_pickle_vm() {
    fuzz("pickle", 10_000, BUDGET, input(CKPT_FIXTURES.len(), 6), pickle_case);
}

const ZIP_TOKENS: &[&[u8]] = &[
    b"PK\x01\x02",       // central directory header
    b"PK\x03\x04",       // local header
    b"PK\x05\x06",       // end of central directory
    b"PK\x06\x06",       // zip64 end of central directory
    b"PK\x06\x07",       // zip64 locator
    b"\x01\x00\x10\x00", // zip64 extra field
    b"\xff\xff\xff\xff",
    b"\xff\xff",
];

fn zip_case(input: &Input) -> Result<(), String> {
    thread_local!(static SEEDS: Vec<Vec<u8>> = CKPT_FIXTURES.iter().map(|f| read_fixture(f)).collect());
    let bytes = SEEDS.with(|seeds| input.bytes(seeds, ZIP_TOKENS));
    open_checkpoint("case.pth", &bytes)
}

#[test]
fn fuzz_zip_directory() {
    fuzz("zip", 6000, BUDGET, input(CKPT_FIXTURES.len(), 4), zip_case);
}

// ---------------------------------------------------------------------------------------------------------------
// WebDataset tar reader

fn tar_seeds() -> Vec<Vec<u8>> {
    let mut w = TarWriter::new(Vec::new());
    w.append("000000.jpg", &[0xff, 0xd8, 0xff, 0xe0, 1, 2, 3]).expect("tar");
    w.append("000000.txt", b"a red circle").expect("tar");
    let long = format!("{}/000001.hint.png", "deep/".repeat(30));
    w.append(&long, &[7u8; 600]).expect("tar");
    w.append("000001.json", b"{}").expect("tar");
    let ours = w.finish().expect("tar");

    // GNU long names and a directory, from the independent writer.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    b.append_data(&mut h, format!("{}/x.txt", "gnu".repeat(50)), &b"hello"[..]).expect("tar");
    let mut d = tar::Header::new_gnu();
    d.set_entry_type(tar::EntryType::Directory);
    d.set_size(0);
    b.append_data(&mut d, "dir/", &[][..]).expect("tar");
    let gnu = b.into_inner().expect("tar");

    vec![ours, gnu, read_fixture("webdataset/python-tarwriter.tar")]
}

const TAR_TOKENS: &[&[u8]] = &[
    b"ustar\x0000",
    b"ustar  \x00",
    b"99999999999\x00",
    b"77777777777\x00",
    b"\x80\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff", // base-256 size
    b"\xbf\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", // base-256, huge
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", // base-256, negative
    b"29 size=18446744073709551615\n",
    b"25 size=9999999999999999\n",
    b"20 path=../../etc/x\n",
    b"9999999 path=x\n",
    b"L",
    b"K",
    b"x",
    b"g",
    b"5",
    b"3",
    b"6",
];

/// Rewrites the checksum of every 512-byte block that looks like a ustar header, so mutations of the other header
/// fields get past the checksum test.
fn fix_tar_checksums(data: &mut [u8]) {
    for block in data.chunks_exact_mut(512) {
        if &block[257..262] != b"ustar" {
            continue;
        }
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| b as u32).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }
}

fn tar_case(input: &Input) -> Result<(), String> {
    thread_local!(static SEEDS: Vec<Vec<u8>> = tar_seeds());
    let mut bytes = SEEDS.with(|seeds| input.bytes(seeds, TAR_TOKENS));
    if input.fix {
        fix_tar_checksums(&mut bytes);
    }
    read_tar(&bytes)
}

/// Reads every member (the data of every other one, the rest skipped); an error ends the archive.
fn read_tar(bytes: &[u8]) -> Result<(), String> {
    let mut reader = TarReader::new(Cursor::new(bytes));
    for i in 0.. {
        if i > bytes.len() / 512 + 2 {
            return Err(format!("more members than 512-byte blocks ({i}): a loop"));
        }
        match reader.next_entry() {
            Ok(None) => return Ok(()),
            Ok(Some(entry)) => {
                if i % 2 == 0 {
                    if let Err(e) = reader.read_data(&entry) {
                        return check_message("read_data", e.to_string());
                    }
                }
            }
            Err(e) => return check_message("next_entry", e.to_string()),
        }
        if reader.offset() > bytes.len() as u64 {
            return Err(format!("offset {} past the end ({} bytes)", reader.offset(), bytes.len()));
        }
    }
    Ok(())
}

#[test]
fn fuzz_tar_reader() {
    fuzz("tar", 100_000, BUDGET, input(3, 6), tar_case);
}

/// One member of a generated archive: an optional pax record (key, value) before it, its type flag, how its size
/// field is written and how many data bytes follow.
type GenMember = (Option<(Index, Index)>, Index, u8, u64, u16);

const PAX_KEYS: &[&str] = &["size", "path", "linkpath", "mtime", "size", ""];
const PAX_VALUES: &[&str] = &[
    "0",
    "5",
    "512",
    "00000000000000000005",
    "18446744073709551615",
    "18446744073709551104",
    "18446744073709551616",
    "9223372036854775807",
    "1099511627776",
    "-1",
    "0x10",
    "",
    "a/b.txt",
    "../x",
    "\u{0}",
];
const TYPEFLAGS: &[u8] = b"0\x0075LKxg1236";

/// A ustar header with a correct checksum; `size` is the raw 12-byte size field.
fn ustar_header(name: &str, size: [u8; 12], typeflag: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name.as_bytes()[..n]);
    h[100..108].copy_from_slice(b"0000644\0");
    h[124..136].copy_from_slice(&size);
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    fix_tar_checksums(&mut h);
    h
}

fn octal12(v: u64) -> [u8; 12] {
    let mut f = [0u8; 12];
    let text = format!("{:011o}", v & 0o777_7777_7777);
    f[..11].copy_from_slice(text.as_bytes());
    f
}

/// Writes a generated archive: members with pax headers whose values, size fields (octal, base-256 up to u64::MAX,
/// or garbage) and type flags are drawn from hostile choices, each followed by the data it declares or less.
fn gen_tar(members: &[GenMember]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (pax, flag, size_kind, size, data_len)) in members.iter().enumerate() {
        if let Some((k, v)) = pax {
            let body = format!(" {}={}\n", PAX_KEYS[k.index(PAX_KEYS.len())], PAX_VALUES[v.index(PAX_VALUES.len())]);
            // The record's length counts its own digits.
            let mut len = body.len() + 1;
            while format!("{len}").len() + body.len() != len {
                len += 1;
            }
            let record = format!("{len}{body}");
            out.extend_from_slice(&ustar_header("PaxHeaders/x", octal12(record.len() as u64), b'x'));
            out.extend_from_slice(record.as_bytes());
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        let size_field = match size_kind % 3 {
            0 => octal12(*data_len as u64),
            1 => {
                let mut f = [0u8; 12];
                f[4..].copy_from_slice(&size.to_be_bytes());
                f[0] = 0x80;
                f
            }
            _ => {
                let mut f = [0u8; 12];
                f[..8].copy_from_slice(&size.to_le_bytes());
                f
            }
        };
        out.extend_from_slice(&ustar_header(
            &format!("{i:06}.bin"),
            size_field,
            TYPEFLAGS[flag.index(TYPEFLAGS.len())],
        ));
        out.extend(std::iter::repeat_n(0xab, *data_len as usize));
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

// `fuzz` passes the strategy's value, a Vec, by reference.
#[allow(clippy::ptr_arg)]
fn tar_gen_case(members: &Vec<GenMember>) -> Result<(), String> {
    read_tar(&gen_tar(members))
}

#[test]
fn fuzz_tar_reader_generated_headers() {
    let size = prop_oneof![Just(u64::MAX), Just(u64::MAX - 511), Just(1 << 40), 0u64..2048, any::<u64>()];
    let member = (prop::option::of((any::<Index>(), any::<Index>())), any::<Index>(), any::<u8>(), size, 0u16..1500);
    fuzz("tar-generated", 100_000, BUDGET, prop::collection::vec(member, 1..5), tar_gen_case);
}

// ---------------------------------------------------------------------------------------------------------------
// YAML config layer and overrides

const YAML_SEED: &str = "\
defaults: &base
  lr: 1.0e-4
  steps: 10
model:
  <<: *base
  base_learning_rate: ${model.defaults.lr}
  channels: [32, 64, {a: 1, b: [2, 3]}]
  name: 'quoted: text'
  sd_locked: True
  note: |
    block
    text
trainer:
  max_steps: ${oc.env:HOME,5}
  precision: bf16
  devices: !!int 1
list:
  - a
  - *base
  - ? complex key
    : value
";

const YAML_TOKENS: &[&[u8]] = &[
    b"&x ",
    b"*x",
    b"*base",
    b"<<: *base\n",
    b"<<: [*base, *base]\n",
    b"[",
    b"]",
    b"{",
    b"}",
    b"- ",
    b": ",
    b"\n  ",
    b"\n    - ",
    b"? ",
    b"!!str ",
    b"!!map ",
    b"!custom ",
    b"---\n",
    b"...\n",
    b"%YAML 1.2\n",
    b"'",
    b"\"",
    b"\\u0000",
    b"|",
    b">-",
    b"#",
    b"\t",
    b"${",
    b"}",
    b"${model.channels}",
    b"${oc.env:X}",
    b"${..x}",
    b"${${a}}",
    b"1e999",
    b".nan",
    b"0x7fffffffffffffffff",
    b"-",
    b"~",
    b"null",
    b"\xef\xbb\xbf",
    b"\xc3\x28",
];

fn yaml_case(input: &Input) -> Result<(), String> {
    thread_local!(static SEEDS: Vec<Vec<u8>> =
        vec![YAML_SEED.as_bytes().to_vec(), TINY_YAML.as_bytes().to_vec(), b"a: [1, {b: &c [*c]}]\n".to_vec()]);
    let bytes = SEEDS.with(|seeds| input.bytes(seeds, YAML_TOKENS));
    let text = String::from_utf8_lossy(&bytes);
    match Config::from_yaml_str(&text, "fuzz.yaml", &[]) {
        Ok(config) => {
            // What loads must also write out and load back.
            Config::from_yaml_str(&config.to_yaml(), "round-trip.yaml", &[])
                .map(|_| ())
                .map_err(|e| format!("a loaded config does not load back: {e}"))
        }
        Err(e) => check_message("from_yaml_str", e.to_string()),
    }
}

#[test]
fn fuzz_yaml_layer() {
    fuzz("yaml", 60_000, BUDGET, input(3, 6), yaml_case);
}

const OVERRIDE_SEEDS: &[&str] = &[
    "trainer.max_steps=100",
    "model.sd_locked=False",
    "+model.new_key=1",
    "++trainer.precision=bf16",
    "~model.base_learning_rate",
    "~trainer.max_steps=5",
    "model.data.train.dataset_path=[a.tar,b.tar]",
    "model.x={a: 1, b: [2, 3]}",
    "trainer.devices='x y'",
    "model.base_learning_rate=${trainer.max_steps}",
];

const OVERRIDE_TOKENS: &[&[u8]] = &[
    b"=",
    b"+",
    b"++",
    b"~",
    b".",
    b"..",
    b"@",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b": ",
    b"'",
    b"\"",
    b"${",
    b"}",
    b"&a ",
    b"*a",
    b"\n",
    b"#",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    b"model.",
    b"trainer.",
    b"data.",
    b"0",
    b"-1",
    b"1e999",
    b"99999999999999999999",
    b"null",
    b"~",
];

fn override_case(input: &(Vec<Input>, bool)) -> Result<(), String> {
    thread_local!(static SEEDS: Vec<Vec<u8>> = OVERRIDE_SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect());
    let (inputs, builtin) = input;
    let overrides: Vec<String> = SEEDS.with(|seeds| {
        inputs.iter().map(|i| String::from_utf8_lossy(&i.bytes(seeds, OVERRIDE_TOKENS)).into_owned()).collect()
    });
    let text = if *builtin { TINY_YAML } else { YAML_SEED };
    match Config::from_yaml_str(text, "fuzz.yaml", &overrides) {
        Ok(_) => Ok(()),
        Err(e) => check_message("overrides", e.to_string()),
    }
}

#[test]
fn fuzz_override_parser() {
    let strategy = (prop::collection::vec(input(OVERRIDE_SEEDS.len(), 4), 1..4), any::<bool>());
    fuzz("overrides", 60_000, BUDGET, strategy, override_case);
}

// ---------------------------------------------------------------------------------------------------------------
// Regression cases the fuzz targets found.

/// A pax `size` record of u64::MAX made the reader's padding arithmetic overflow (a panic in debug builds; in
/// release the padded length wrapped to 0 and the member's data was read as the next header).
#[test]
fn a_pax_size_of_u64_max_is_an_error_naming_the_header() {
    let record = "29 size=18446744073709551615\n";
    assert_eq!(record.len(), 29);
    let mut tar = ustar_header("PaxHeaders/x", octal12(record.len() as u64), b'x').to_vec();
    tar.extend_from_slice(record.as_bytes());
    tar.resize(1024, 0);
    tar.extend_from_slice(&ustar_header("000000.jpg", octal12(0), b'0'));
    tar.extend_from_slice(&[0u8; 1024]);
    let err = TarReader::new(Cursor::new(&tar)).next_entry().expect_err("an impossible size");
    assert_eq!(err.to_string(), "at byte 1024: member size 18446744073709551615 is impossibly large (corrupt header)");
}

/// The same through GNU's base-256 size field.
#[test]
fn a_base256_size_of_u64_max_is_an_error_naming_the_header() {
    let mut size = [0xffu8; 12];
    size[..4].copy_from_slice(&[0x80, 0, 0, 0]);
    let mut tar = ustar_header("000000.jpg", size, b'0').to_vec();
    tar.extend_from_slice(&[0u8; 1024]);
    let err = TarReader::new(Cursor::new(&tar)).next_entry().expect_err("an impossible size");
    assert!(err.to_string().starts_with("at byte 0: member size 18446744073709551615 is impossibly large"), "{err}");
}
