//! A streaming tar reader and writer, just enough of POSIX/GNU tar for WebDataset shards.
//!
//! The reader pulls one 512-byte header at a time from any `Read` and hands out member data one member at a time,
//! so a shard is never held whole in memory. It validates every header checksum and understands ustar (name +
//! prefix), GNU long names (`././@LongLink`, type `L`), pax extended headers (`path`, `size`), directories, padding
//! and the zero end blocks. Every failure carries the byte offset where it was detected, so the caller can name
//! the shard and the place of the damage.

use std::fmt;
use std::io::{self, Read, Write};

const BLOCK: usize = 512;

/// Where in the archive reading failed, and why. The caller adds the shard's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarError {
    /// Byte offset in the archive at which the problem was found.
    pub offset: u64,
    pub msg: String,
}

impl fmt::Display for TarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at byte {}: {}", self.offset, self.msg)
    }
}

impl std::error::Error for TarError {}

/// What a member is. Only `File` members carry sample data; the others are reported so callers can skip them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
    /// Links, devices, FIFOs, sparse files...: the raw type flag.
    Other(u8),
}

/// One member's header, with metadata extensions (long names, pax) already applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Offset of the member's own header (after any long-name or pax headers that precede it).
    pub header_offset: u64,
}

/// Reads a tar archive member by member from a byte stream.
pub struct TarReader<R> {
    inner: R,
    /// Bytes consumed from `inner` so far.
    offset: u64,
    /// Unread data + padding bytes of the current member; skipped before the next header is read.
    pending: u64,
    /// Size of the current member's data not yet read (a subset of `pending`).
    pending_data: u64,
    finished: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader { inner, offset: 0, pending: 0, pending_data: 0, finished: false }
    }

    /// Bytes of the archive consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next member, or `None` at the end-of-archive marker. Skips whatever remains of the previous member.
    pub fn next_entry(&mut self) -> Result<Option<TarEntry>, TarError> {
        if self.finished {
            return Ok(None);
        }
        self.skip_pending()?;
        let mut long_name: Option<String> = None;
        let mut pax_path: Option<String> = None;
        let mut pax_size: Option<u64> = None;
        loop {
            let header_offset = self.offset;
            let mut block = [0u8; BLOCK];
            let got = self.read_up_to(&mut block)?;
            if got == 0 {
                self.finished = true;
                if header_offset == 0 {
                    return Err(TarError { offset: 0, msg: "empty file, not a tar archive".into() });
                }
                if long_name.is_some() || pax_path.is_some() || pax_size.is_some() {
                    return Err(self.error_at(header_offset, "archive ends after an extended header, member missing"));
                }
                return Err(self.error_at(
                    header_offset,
                    "archive ends without its end-of-archive blocks (truncated at a member boundary?)",
                ));
            }
            if got < BLOCK {
                self.finished = true;
                if header_offset == 0 {
                    let msg = format!("not a tar archive (only {got} bytes, less than one tar header)");
                    return Err(self.error_at(0, msg));
                }
                return Err(self.error_at(
                    header_offset + got as u64,
                    format!("truncated inside the header that starts at byte {header_offset}"),
                ));
            }
            if block.iter().all(|&b| b == 0) {
                // The first zero block marks the end; the second one (or EOF) usually follows. Anything after is
                // not part of the archive (GNU tar pads archives to a record size with zeros).
                self.finished = true;
                return Ok(None);
            }
            let header = Header::parse(&block).map_err(|msg| {
                self.finished = true;
                let msg = if header_offset == 0 {
                    let gzip = block[0] == 0x1f && block[1] == 0x8b;
                    if gzip {
                        "compressed (gzip) file: shards must be uncompressed tar".to_string()
                    } else {
                        format!("not a tar archive ({msg})")
                    }
                } else {
                    format!("corrupt tar header ({msg})")
                };
                TarError { offset: header_offset, msg }
            })?;
            let size = pax_size.take().unwrap_or(header.size);
            if size > u64::MAX - (BLOCK as u64 - 1) {
                // Its padded length would overflow: no archive holds this much (a pax or base-256 size field).
                self.finished = true;
                return Err(
                    self.error_at(header_offset, format!("member size {size} is impossibly large (corrupt header)"))
                );
            }
            match header.typeflag {
                b'L' => {
                    let data = self.read_meta(size, header_offset, "GNU long name")?;
                    long_name = Some(c_string(&data));
                }
                b'K' => {
                    // GNU long link target: links are skipped, so the target is not needed.
                    self.read_meta(size, header_offset, "GNU long link")?;
                }
                b'x' => {
                    let data = self.read_meta(size, header_offset, "pax header")?;
                    let records = parse_pax(&data).map_err(|msg| self.error_at(header_offset, msg))?;
                    for (key, value) in records {
                        match key.as_str() {
                            "path" => pax_path = Some(value),
                            "size" => {
                                let parsed = value.parse::<u64>().map_err(|_| {
                                    self.error_at(header_offset, format!("pax size {value:?} is not a number"))
                                })?;
                                pax_size = Some(parsed);
                            }
                            _ => {}
                        }
                    }
                }
                b'g' => {
                    // Global pax headers set defaults (times, owners) that samples do not need.
                    self.read_meta(size, header_offset, "pax global header")?;
                }
                flag => {
                    let kind = match flag {
                        b'0' | 0 | b'7' => EntryKind::File,
                        b'5' => EntryKind::Directory,
                        other => EntryKind::Other(other),
                    };
                    let path = pax_path.take().or(long_name.take()).unwrap_or(header.path);
                    // Links, devices, directories and FIFOs have no data blocks whatever their size field says
                    // (as Python's tarfile reads them); regular files and unknown types do.
                    let data_size = match kind {
                        EntryKind::Directory | EntryKind::Other(b'1' | b'2' | b'3' | b'4' | b'6') => 0,
                        _ => size,
                    };
                    self.pending_data = data_size;
                    self.pending = padded(data_size);
                    return Ok(Some(TarEntry { path, kind, size: data_size, header_offset }));
                }
            }
        }
    }

    /// Reads the current member's data (then its padding). Call once, after `next_entry`.
    pub fn read_data(&mut self, entry: &TarEntry) -> Result<Vec<u8>, TarError> {
        let size = self.pending_data;
        // Grow the buffer as bytes arrive so a header that lies about its size cannot make us allocate gigabytes.
        let mut data = Vec::with_capacity(size.min(64 << 20) as usize);
        let start = self.offset;
        let got = (&mut self.inner)
            .take(size)
            .read_to_end(&mut data)
            .map_err(|e| TarError { offset: start, msg: format!("read error in member '{}': {e}", entry.path) })?;
        self.offset += got as u64;
        self.pending -= got as u64;
        self.pending_data = 0;
        if (got as u64) < size {
            self.finished = true;
            return Err(TarError {
                offset: self.offset,
                msg: format!(
                    "truncated inside member '{}' (header at byte {}, {} of {} data bytes present)",
                    entry.path, entry.header_offset, got, size
                ),
            });
        }
        self.skip_pending()?;
        Ok(data)
    }

    fn read_meta(&mut self, size: u64, header_offset: u64, what: &str) -> Result<Vec<u8>, TarError> {
        if size > 1 << 20 {
            self.finished = true;
            return Err(self.error_at(header_offset, format!("{what} of {size} bytes is implausibly large")));
        }
        let entry = TarEntry { path: what.to_string(), kind: EntryKind::Other(0), size, header_offset };
        self.pending_data = size;
        self.pending = padded(size);
        self.read_data(&entry)
    }

    fn skip_pending(&mut self) -> Result<(), TarError> {
        if self.pending == 0 {
            return Ok(());
        }
        let start = self.offset;
        let want = self.pending;
        let skipped = io::copy(&mut (&mut self.inner).take(want), &mut io::sink())
            .map_err(|e| TarError { offset: start, msg: format!("read error: {e}") })?;
        self.offset += skipped;
        self.pending = 0;
        self.pending_data = 0;
        if skipped < want {
            self.finished = true;
            return Err(TarError { offset: self.offset, msg: "truncated inside member data or padding".into() });
        }
        Ok(())
    }

    /// Fills `buf` unless the stream ends first; returns how many bytes were read.
    fn read_up_to(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.finished = true;
                    return Err(TarError { offset: self.offset + filled as u64, msg: format!("read error: {e}") });
                }
            }
        }
        self.offset += filled as u64;
        Ok(filled)
    }

    fn error_at(&self, offset: u64, msg: impl Into<String>) -> TarError {
        TarError { offset, msg: msg.into() }
    }
}

fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK as u64) * BLOCK as u64
}

/// The fields of a 512-byte header that a reader needs.
struct Header {
    path: String,
    size: u64,
    typeflag: u8,
}

impl Header {
    fn parse(block: &[u8; BLOCK]) -> Result<Header, String> {
        let stored = parse_octal(&block[148..156]).ok_or("checksum field is not a number")?;
        let (unsigned, signed) = checksums(block);
        if stored != unsigned && stored as i64 != signed {
            return Err(format!("checksum mismatch: header says {stored}, bytes sum to {unsigned}"));
        }
        let size = parse_number(&block[124..136]).ok_or("size field is not a number")?;
        let name = c_string(&block[0..100]);
        // Only POSIX ustar ("ustar\0") has a prefix field; the old GNU format ("ustar  ") keeps times there.
        let path = if &block[257..263] == b"ustar\0" && block[345] != 0 {
            format!("{}/{}", c_string(&block[345..500]), name)
        } else {
            name
        };
        Ok(Header { path, size, typeflag: block[156] })
    }
}

/// Header checksum computed with the checksum field read as spaces, as unsigned and as signed bytes (old tars).
fn checksums(block: &[u8; BLOCK]) -> (u64, i64) {
    let mut unsigned = 0u64;
    let mut signed = 0i64;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as u64;
        signed += b as i8 as i64;
    }
    (unsigned, signed)
}

/// Octal digits, optionally surrounded by spaces and NULs.
fn parse_octal(field: &[u8]) -> Option<u64> {
    let text: Vec<u8> = field.iter().copied().filter(|&b| b != 0 && b != b' ').collect();
    if text.is_empty() {
        return Some(0);
    }
    let mut value: u64 = 0;
    for b in text {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        value = value.checked_mul(8)?.checked_add((b - b'0') as u64)?;
    }
    Some(value)
}

/// A numeric field: octal, or GNU's base-256 (high bit of the first byte set) for values that do not fit.
fn parse_number(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        if field[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut value: u64 = (field[0] & 0x3f) as u64;
        for &b in &field[1..] {
            value = value.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(value);
    }
    parse_octal(field)
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Parses pax records: `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn parse_pax(data: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut records = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let space = rest.iter().position(|&b| b == b' ').ok_or("pax record without a length")?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("pax record length is not a number")?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err("pax record length does not match its content".into());
        }
        let body = &rest[space + 1..len - 1];
        let eq = body.iter().position(|&b| b == b'=').ok_or("pax record without '='")?;
        let key = String::from_utf8_lossy(&body[..eq]).into_owned();
        let value = String::from_utf8_lossy(&body[eq + 1..]).into_owned();
        records.push((key, value));
        rest = &rest[len..];
    }
    Ok(records)
}

/// Writes POSIX (ustar + pax) tar archives. Names longer than ustar allows get a pax `path` record.
pub struct TarWriter<W: Write> {
    inner: W,
    written: u64,
    /// Modification time stamped on every member. Fixed by default so identical input gives identical shards.
    mtime: u64,
}

impl<W: Write> TarWriter<W> {
    pub fn new(inner: W) -> Self {
        TarWriter { inner, written: 0, mtime: 0 }
    }

    pub fn with_mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }

    /// Bytes written so far (headers, data, padding).
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Appends a regular file.
    pub fn append(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        let size = data.len() as u64;
        let split = split_ustar_name(path);
        let needs_pax = split.is_none() || size > MAX_OCTAL_11;
        if needs_pax {
            let mut records = Vec::new();
            if split.is_none() {
                records.extend(pax_record("path", path));
            }
            if size > MAX_OCTAL_11 {
                records.extend(pax_record("size", &size.to_string()));
            }
            let pax_name = format!("PaxHeaders/{}", truncate_utf8(path.rsplit('/').next().unwrap_or(path), 80));
            let header = self.header(&pax_name, "", records.len() as u64, b'x');
            self.write_block(&header)?;
            self.write_data(&records)?;
        }
        let (prefix, name) = split.unwrap_or(("", truncate_utf8(path, 100)));
        let header = self.header(name, prefix, size.min(MAX_OCTAL_11), b'0');
        self.write_block(&header)?;
        self.write_data(data)
    }

    /// Writes the two zero end blocks and returns the inner writer (flushed).
    pub fn finish(mut self) -> io::Result<W> {
        self.write_block(&[0u8; BLOCK])?;
        self.write_block(&[0u8; BLOCK])?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    fn header(&self, name: &str, prefix: &str, size: u64, typeflag: u8) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        write_octal(&mut h[100..108], 0o644);
        write_octal(&mut h[108..116], 0);
        write_octal(&mut h[116..124], 0);
        write_octal(&mut h[124..136], size);
        write_octal(&mut h[136..148], self.mtime.min(MAX_OCTAL_11));
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| b as u64).sum();
        write_octal(&mut h[148..155], sum);
        h[155] = b' ';
        h
    }

    fn write_block(&mut self, block: &[u8; BLOCK]) -> io::Result<()> {
        self.inner.write_all(block)?;
        self.written += BLOCK as u64;
        Ok(())
    }

    fn write_data(&mut self, data: &[u8]) -> io::Result<()> {
        self.inner.write_all(data)?;
        let pad = (padded(data.len() as u64) - data.len() as u64) as usize;
        self.inner.write_all(&[0u8; BLOCK][..pad])?;
        self.written += data.len() as u64 + pad as u64;
        Ok(())
    }
}

/// The largest value an 11-digit octal field holds (8 GiB - 1).
const MAX_OCTAL_11: u64 = 0o77777777777;

/// Zero-padded octal digits followed by a NUL, filling the field.
fn write_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

/// Splits a path into ustar (prefix, name) fields if it fits: name <= 100 bytes, prefix <= 155, split at a '/'.
fn split_ustar_name(path: &str) -> Option<(&str, &str)> {
    if path.len() <= 100 {
        return Some(("", path));
    }
    path.char_indices()
        .filter(|&(i, c)| c == '/' && i <= 155)
        .map(|(i, _)| (&path[..i], &path[i + 1..]))
        .find(|(_, name)| !name.is_empty() && name.len() <= 100)
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One pax record; its length prefix counts itself, so grow it until it is self-consistent.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    format!("{len} {key}={value}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        for (path, data) in members {
            w.append(path, data).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_all(bytes: &[u8]) -> (Vec<(String, Vec<u8>)>, Option<TarError>) {
        let mut r = TarReader::new(bytes);
        let mut out = Vec::new();
        loop {
            match r.next_entry() {
                Ok(Some(e)) => {
                    let data = match r.read_data(&e) {
                        Ok(d) => d,
                        Err(err) => return (out, Some(err)),
                    };
                    out.push((e.path, data));
                }
                Ok(None) => return (out, None),
                Err(err) => return (out, Some(err)),
            }
        }
    }

    #[test]
    fn round_trip_with_padding_and_empty_members() {
        let bytes = archive(&[("a.txt", b"hello"), ("b.bin", &[7u8; 512]), ("c.empty", b"")]);
        assert_eq!(bytes.len() % 512, 0);
        let (members, err) = read_all(&bytes);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(members.len(), 3);
        assert_eq!(members[0], ("a.txt".to_string(), b"hello".to_vec()));
        assert_eq!(members[1].1, vec![7u8; 512]);
        assert!(members[2].1.is_empty());
    }

    #[test]
    fn long_names_use_prefix_or_pax() {
        let via_prefix = format!("{}/{}", "d".repeat(120), "f.jpg");
        let via_pax = format!("{}.jpg", "n".repeat(300));
        let bytes = archive(&[(&via_prefix, b"1"), (&via_pax, b"2")]);
        let (members, err) = read_all(&bytes);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(members[0].0, via_prefix);
        assert_eq!(members[1].0, via_pax);
        assert_eq!(members[1].1, b"2");
    }

    #[test]
    fn checksum_damage_is_reported_with_offset() {
        let mut bytes = archive(&[("a.txt", b"x"), ("b.txt", b"y")]);
        bytes[1024 + 3] ^= 0x55; // inside the name of the second header
        let (members, err) = read_all(&bytes);
        assert_eq!(members.len(), 1);
        let err = err.unwrap();
        assert_eq!(err.offset, 1024);
        assert!(err.msg.contains("checksum"), "{}", err.msg);
    }

    #[test]
    fn not_a_tar_and_gzip_are_named() {
        let (_, err) = read_all(&[b'x'; 2048]);
        assert!(err.unwrap().msg.contains("not a tar archive"));
        let mut gz = vec![0x1f, 0x8b];
        gz.resize(1024, 1);
        assert!(read_all(&gz).1.unwrap().msg.contains("gzip"));
        assert!(read_all(&[]).1.unwrap().msg.contains("empty"));
        assert!(read_all(b"garbage\n").1.unwrap().msg.contains("not a tar archive (only 8 bytes"));
    }

    #[test]
    fn truncation_mid_data_mid_header_and_at_boundary() {
        let bytes = archive(&[("a.txt", &[1u8; 700]), ("b.txt", b"y")]);
        // mid-data of the first member
        let (members, err) = read_all(&bytes[..512 + 300]);
        assert!(members.is_empty());
        let err = err.unwrap();
        assert_eq!(err.offset, 812);
        assert!(err.msg.contains("a.txt") && err.msg.contains("300 of 700"), "{}", err.msg);
        // mid-header of the second member (header at 512 + 1024)
        let (members, err) = read_all(&bytes[..1536 + 100]);
        assert_eq!(members.len(), 1);
        let err = err.unwrap();
        assert_eq!(err.offset, 1636);
        assert!(err.msg.contains("header that starts at byte 1536"), "{}", err.msg);
        // exactly at a member boundary: no end blocks
        let (members, err) = read_all(&bytes[..1536]);
        assert_eq!(members.len(), 1);
        assert!(err.unwrap().msg.contains("end-of-archive"));
    }

    #[test]
    fn numbers_octal_and_base256() {
        assert_eq!(parse_octal(b"0000644\0"), Some(0o644));
        assert_eq!(parse_octal(b"  12 \0"), Some(0o12));
        assert_eq!(parse_octal(b"0009"), None);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 5;
        big[10] = 1;
        assert_eq!(parse_number(&big), Some(256 + 5));
    }

    #[test]
    fn pax_record_lengths_are_self_consistent() {
        for value_len in [0, 1, 5, 89, 90, 91, 995, 996, 997] {
            let value = "v".repeat(value_len);
            let rec = pax_record("path", &value);
            let parsed = parse_pax(&rec).unwrap();
            assert_eq!(parsed, vec![("path".to_string(), value)]);
        }
    }
}
