//! `zeroconv dataset make`: write WebDataset shards from a folder of (image, control map, caption) triples.
//!
//! Two input layouts:
//! - fill50k: `prompt.json` with one JSON object per line, `{"source": "source/0.png", "target": "target/0.png",
//!   "prompt": "..."}`; the source is the control map, the target the image, paths relative to the folder.
//! - subfolders: `images/NAME.{jpg,jpeg,png,webp}`, `controls/NAME.*`, `captions/NAME.txt`, matched by NAME.
//!
//! Each sample becomes `KEY.jpg` (or `KEY.webp`), `KEY.png` and `KEY.txt`. JPEG/WebP images and PNG control maps
//! are stored byte for byte; other images are re-encoded (the image as JPEG at `--quality`, the map as PNG, which is
//! lossless). Every shard is written to a temporary file, synced and renamed, so a crash never leaves a partial
//! shard under its final name.

use std::fs::{self, File};
use std::io::{BufWriter, Cursor, Read};
use std::path::{Path, PathBuf};

use image::ImageFormat;
use serde::Deserialize;

use super::decode::decode_rgb;
use super::tar::TarWriter;
use crate::io::outputs::{check_output, Inputs};
use crate::{Error, Result};

/// What `make_shards` writes: shards from a folder of image / control map / caption triples.
///
/// The folder holds either a fill50k-style `prompt.json` (lines of {"source", "target", "prompt"}) or the
/// subfolders `images/`, `controls/` and `captions/` with files matched by name.
#[derive(Debug, Clone)]
pub struct MakeOptions {
    /// Input folder (fill50k layout with prompt.json, or images/ controls/ captions/ subfolders).
    pub input: PathBuf,
    /// Output shard names, with a printf-style shard number, e.g. `shards/fill50k-%06d.tar`.
    pub output: String,
    /// Samples per shard.
    pub maxcount: usize,
    /// Also start a new shard before a shard would exceed this many bytes.
    pub maxsize: Option<u64>,
    /// JPEG quality (1-100) for images that are not JPEG or WebP already and must be re-encoded.
    pub quality: u8,
    /// Stop at the first unreadable input instead of skipping it.
    pub strict: bool,
    /// Overwrite shards that exist already (a shard is never written over one of the inputs).
    pub force: bool,
}

/// One input sample, by file paths.
#[derive(Debug, Clone)]
pub struct SourceTriple {
    pub key: String,
    pub image: PathBuf,
    pub control: PathBuf,
    /// Caption text (fill50k) or a text file to read.
    pub caption: Caption,
}

#[derive(Debug, Clone)]
pub enum Caption {
    Text(String),
    File(PathBuf),
}

/// What `make` did.
#[derive(Debug, Clone, Default)]
pub struct MakeReport {
    pub shards: Vec<PathBuf>,
    pub samples: u64,
    pub skipped: u64,
    /// The first skipped inputs, with reasons.
    pub skipped_reasons: Vec<String>,
}

/// Finds the samples of `dir` in either layout.
pub fn find_triples(dir: &Path) -> Result<Vec<SourceTriple>> {
    let prompt_json = dir.join("prompt.json");
    if prompt_json.is_file() {
        return fill50k_triples(dir, &prompt_json);
    }
    if dir.join("images").is_dir() {
        return folder_triples(dir);
    }
    Err(Error::file(dir, "neither a prompt.json (fill50k layout) nor an images/ subfolder found"))
}

#[derive(Deserialize)]
struct PromptLine {
    source: String,
    target: String,
    prompt: String,
}

fn fill50k_triples(dir: &Path, prompt_json: &Path) -> Result<Vec<SourceTriple>> {
    let text = fs::read_to_string(prompt_json).map_err(|e| Error::file(prompt_json, format!("cannot read: {e}")))?;
    let root = fs::canonicalize(dir).map_err(|e| Error::file(dir, format!("cannot resolve the folder: {e}")))?;
    // A path of prompt.json names a file inside the folder: not absolute, no `..`, and no symlink out of it.
    let inside = |n: usize, field: &str, rel: &str| -> Result<PathBuf> {
        let refuse = |why: String| {
            Err(Error::file(
                prompt_json,
                format!("line {n}: \"{field}\": {rel:?} {why}; refused (paths stay inside the folder)"),
            ))
        };
        let relative = Path::new(rel);
        if relative.is_absolute() || relative.has_root() {
            return refuse("is an absolute path".into());
        }
        if relative.components().any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir)) {
            return refuse("leaves the input folder through `..`".into());
        }
        let path = dir.join(relative);
        // A missing file is skipped later as unreadable; an existing one must resolve inside the folder.
        if let Ok(real) = fs::canonicalize(&path) {
            if !real.starts_with(&root) {
                return refuse(format!("resolves to {} outside the input folder {}", real.display(), root.display()));
            }
        }
        Ok(path)
    };
    let mut triples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry: PromptLine = serde_json::from_str(line)
            .map_err(|e| Error::file(prompt_json, format!("line {}: {e} (want source, target, prompt)", n + 1)))?;
        let target = inside(n + 1, "target", &entry.target)?;
        let source = inside(n + 1, "source", &entry.source)?;
        triples.push(SourceTriple {
            key: sample_key(&target),
            image: target,
            control: source,
            caption: Caption::Text(entry.prompt),
        });
    }
    Ok(triples)
}

fn folder_triples(dir: &Path) -> Result<Vec<SourceTriple>> {
    let by_stem = |sub: &str| -> Result<std::collections::BTreeMap<String, PathBuf>> {
        let folder = dir.join(sub);
        let mut map = std::collections::BTreeMap::new();
        if !folder.is_dir() {
            return Ok(map);
        }
        let entries = fs::read_dir(&folder).map_err(|e| Error::file(&folder, format!("cannot list: {e}")))?;
        for entry in entries {
            let path = entry.map_err(|e| Error::file(&folder, format!("cannot list: {e}")))?.path();
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                if path.is_file() {
                    if let Some(previous) = map.insert(stem.to_string(), path.clone()) {
                        return Err(Error::file(&path, format!("same name as {}", previous.display())));
                    }
                }
            }
        }
        Ok(map)
    };
    let images = by_stem("images")?;
    let controls = by_stem("controls")?;
    let captions = by_stem("captions")?;
    Ok(images
        .into_iter()
        .map(|(stem, image)| SourceTriple {
            key: sample_key(&image),
            control: controls.get(&stem).cloned().unwrap_or_else(|| dir.join("controls").join(format!("{stem}.png"))),
            caption: Caption::File(
                captions.get(&stem).cloned().unwrap_or_else(|| dir.join("captions").join(format!("{stem}.txt"))),
            ),
            image,
        })
        .collect())
}

/// The file stem, with dots replaced: a dot would end the key when the shard is read back.
fn sample_key(path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    stem.replace('.', "_")
}

/// The largest input file (image, control map, caption) read: far above any real image, far below memory.
const MAX_INPUT_BYTES: u64 = 1 << 30;

/// Reads one input file. Only regular files: a FIFO would block and a device such as /dev/zero never ends. At most
/// the size the file had when opened is read.
fn read_input(p: &Path) -> std::result::Result<Vec<u8>, String> {
    let fail = |e: std::io::Error| format!("{}: {e}", p.display());
    let meta = fs::metadata(p).map_err(fail)?;
    if !meta.is_file() {
        return Err(format!("{}: {}, not a regular file; refused", p.display(), file_kind(&meta.file_type())));
    }
    let file = File::open(p).map_err(fail)?;
    let len = file.metadata().map_err(fail)?.len();
    if len > MAX_INPUT_BYTES {
        return Err(format!("{}: {len} bytes, more than the {MAX_INPUT_BYTES} an input file may have", p.display()));
    }
    let mut data = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut data).map_err(fail)?;
    Ok(data)
}

/// What a file that is not a regular file is, for messages.
fn file_kind(t: &fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "a special file"
    }
}

/// The encoded members of one sample, or why the input is unusable.
fn encode_triple(triple: &SourceTriple, quality: u8) -> std::result::Result<Vec<(String, Vec<u8>)>, String> {
    let read = read_input;
    let image = read(&triple.image)?;
    let (image_ext, image) = match image::guess_format(&image) {
        Ok(ImageFormat::Jpeg) => ("jpg", image),
        Ok(ImageFormat::WebP) => ("webp", image),
        _ => {
            let rgb = decode_rgb(&image).map_err(|e| format!("{}: {e}", triple.image.display()))?;
            let mut out = Cursor::new(Vec::new());
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
                .encode_image(&rgb)
                .map_err(|e| format!("{}: cannot encode as JPEG: {e}", triple.image.display()))?;
            ("jpg", out.into_inner())
        }
    };
    let control = read(&triple.control)?;
    let control = if image::guess_format(&control).ok() == Some(ImageFormat::Png) {
        control
    } else {
        let rgb = decode_rgb(&control).map_err(|e| format!("{}: {e}", triple.control.display()))?;
        let mut out = Cursor::new(Vec::new());
        rgb.write_to(&mut out, ImageFormat::Png).map_err(|e| format!("{}: {e}", triple.control.display()))?;
        out.into_inner()
    };
    let caption = match &triple.caption {
        Caption::Text(text) => text.clone(),
        Caption::File(path) => String::from_utf8(read(path)?)
            .map_err(|_| format!("{}: caption is not UTF-8 text", path.display()))?
            .trim()
            .to_string(),
    };
    Ok(vec![(image_ext.into(), image), ("png".into(), control), ("txt".into(), caption.into_bytes())])
}

/// The widest shard number a pattern may ask for: a 64-bit number has at most 20 digits.
const MAX_SHARD_DIGITS: usize = 20;

/// Formats a printf-style shard pattern (`%d`, `%06d`) with the shard number.
pub fn shard_name(pattern: &str, index: usize) -> Result<String> {
    let bad = || Error::msg(format!("output pattern {pattern:?} needs one shard number like %06d"));
    let start = pattern.find('%').ok_or_else(bad)?;
    let rest = &pattern[start + 1..];
    let d = rest.find('d').ok_or_else(bad)?;
    let spec = &rest[..d];
    if !spec.chars().all(|c| c.is_ascii_digit()) || rest[d + 1..].contains('%') {
        return Err(bad());
    }
    let width: usize = if spec.is_empty() { 0 } else { spec.parse().map_err(|_| bad())? };
    if width > MAX_SHARD_DIGITS {
        return Err(Error::msg(format!(
            "output pattern {pattern:?}: a shard number {width} digits wide is too wide (at most {MAX_SHARD_DIGITS})"
        )));
    }
    Ok(format!("{}{index:0width$}{}", &pattern[..start], &rest[d + 1..]))
}

/// Writes samples into numbered shards, each one atomically (temporary file, fsync, rename).
pub struct ShardWriter {
    pattern: String,
    maxcount: usize,
    maxsize: Option<u64>,
    next_index: usize,
    current: Option<OpenShard>,
    written: Vec<PathBuf>,
}

struct OpenShard {
    tar: TarWriter<BufWriter<File>>,
    temp: PathBuf,
    path: PathBuf,
    samples: usize,
}

impl ShardWriter {
    pub fn new(pattern: &str, maxcount: usize, maxsize: Option<u64>) -> Result<ShardWriter> {
        shard_name(pattern, 0)?;
        if maxcount == 0 {
            return Err(Error::msg("--maxcount must be at least 1"));
        }
        Ok(ShardWriter {
            pattern: pattern.to_string(),
            maxcount,
            maxsize,
            next_index: 0,
            current: None,
            written: Vec::new(),
        })
    }

    /// Appends one sample's members (`KEY.EXT`), starting a new shard when the current one is full.
    pub fn write(&mut self, key: &str, members: &[(String, Vec<u8>)]) -> Result<()> {
        let size: u64 = members.iter().map(|(_, d)| 1024 + d.len() as u64).sum();
        let full = self.current.as_ref().is_some_and(|s| {
            s.samples >= self.maxcount || self.maxsize.is_some_and(|max| s.tar.bytes_written() + size > max)
        });
        if full {
            self.close_current()?;
        }
        if self.current.is_none() {
            self.open_next()?;
        }
        let Some(shard) = self.current.as_mut() else {
            return Err(Error::msg("internal: no open shard"));
        };
        for (ext, data) in members {
            shard
                .tar
                .append(&format!("{key}.{ext}"), data)
                .map_err(|e| Error::file(&shard.temp, format!("write failed: {e}")))?;
        }
        shard.samples += 1;
        Ok(())
    }

    /// Closes the last shard; returns every shard written, in order.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        self.close_current()?;
        Ok(std::mem::take(&mut self.written))
    }

    fn open_next(&mut self) -> Result<()> {
        let path = PathBuf::from(shard_name(&self.pattern, self.next_index)?);
        self.next_index += 1;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| Error::file(parent, format!("cannot create folder: {e}")))?;
        }
        let mut temp = path.clone().into_os_string();
        // Unique per process and writer call, so two writers (threads or processes) never share a temporary file.
        static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        temp.push(format!(".tmp-{}-{n}", std::process::id()));
        let temp = PathBuf::from(temp);
        let file = File::create(&temp).map_err(|e| Error::file(&temp, format!("cannot create: {e}")))?;
        self.current = Some(OpenShard { tar: TarWriter::new(BufWriter::new(file)), temp, path, samples: 0 });
        Ok(())
    }

    fn close_current(&mut self) -> Result<()> {
        let Some(shard) = self.current.take() else { return Ok(()) };
        let fail = |e: std::io::Error| Error::file(&shard.temp, format!("write failed: {e}"));
        let file = shard.tar.finish().map_err(fail)?.into_inner().map_err(|e| fail(e.into_error()))?;
        file.sync_all().map_err(fail)?;
        drop(file);
        fs::rename(&shard.temp, &shard.path).map_err(|e| Error::file(&shard.path, format!("cannot rename: {e}")))?;
        // Make the rename itself durable; not every platform can sync a directory, so failure here is ignored.
        if let Some(dir) = shard.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        self.written.push(shard.path);
        Ok(())
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        // An unfinished shard (error or early return) must not be left behind half-written.
        if let Some(shard) = self.current.take() {
            let _ = fs::remove_file(&shard.temp);
        }
    }
}

/// Before anything is written: no shard may land on an input (an image, a control map, a caption file or
/// prompt.json, whatever path reaches it), and no shard may exist already unless `--force`. A shard holds at least
/// one sample, so the shards are among the first `triples.len()` names of the pattern.
fn check_shard_names(args: &MakeOptions, triples: &[SourceTriple]) -> Result<()> {
    let mut inputs = Inputs::new();
    inputs.add(&args.input.join("prompt.json"), || format!("the input {}", args.input.join("prompt.json").display()));
    for t in triples {
        inputs.add(&t.image, || format!("the input image {}", t.image.display()));
        inputs.add(&t.control, || format!("the input control map {}", t.control.display()));
        if let Caption::File(path) = &t.caption {
            inputs.add(path, || format!("the input caption {}", path.display()));
        }
    }
    for index in 0..triples.len() {
        let name = PathBuf::from(shard_name(&args.output, index)?);
        check_output("--output", &name, &inputs, args.force)?;
    }
    Ok(())
}

/// Writes the shards for `args`; inputs that cannot be read are skipped (or fatal with `strict`).
pub fn make_shards(args: &MakeOptions, progress: bool) -> Result<MakeReport> {
    let triples = find_triples(&args.input)?;
    if triples.is_empty() {
        return Err(Error::file(&args.input, "no samples found"));
    }
    let mut seen = std::collections::HashSet::new();
    for t in &triples {
        if !seen.insert(t.key.as_str()) {
            return Err(Error::file(&t.image, format!("sample key '{}' occurs twice", t.key)));
        }
    }
    let mut writer = ShardWriter::new(&args.output, args.maxcount, args.maxsize)?;
    check_shard_names(args, &triples)?;
    let mut report = MakeReport::default();
    for triple in &triples {
        match encode_triple(triple, args.quality) {
            Ok(members) => {
                writer.write(&triple.key, &members)?;
                report.samples += 1;
            }
            Err(reason) if !args.strict => {
                report.skipped += 1;
                if report.skipped_reasons.len() < 20 {
                    report.skipped_reasons.push(format!("sample '{}': {reason}", triple.key));
                }
                if progress && report.skipped <= 5 {
                    eprintln!("warning: skipped sample '{}': {reason}", triple.key);
                }
            }
            Err(reason) => return Err(Error::msg(format!("sample '{}': {reason}", triple.key))),
        }
        if progress && report.samples > 0 && report.samples % 1000 == 0 {
            eprintln!("{} samples written", report.samples);
        }
    }
    report.shards = writer.finish()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_patterns() {
        assert_eq!(shard_name("out/s-%06d.tar", 12).unwrap(), "out/s-000012.tar");
        assert_eq!(shard_name("%d.tar", 7).unwrap(), "7.tar");
        for bad in ["plain.tar", "a-%x.tar", "%d-%d.tar", "%-3d"] {
            assert!(shard_name(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_never_contain_dots() {
        assert_eq!(sample_key(Path::new("a/img.v2.final.png")), "img_v2_final");
        assert_eq!(sample_key(Path::new("target/0.png")), "0");
    }
}
