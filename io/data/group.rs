//! Grouping consecutive tar members into samples, the way WebDataset does it.
//!
//! A member's key is its path up to the first dot of its base name, and the rest is its extension
//! (`dir/a.b.c.jpg` → key `dir/a`, extension `b.c.jpg`, lower-cased). Consecutive members with the same key form
//! one sample; members without a dot in their base name, directories, links, and `__meta__` files are skipped.

use std::io::Read;
use std::sync::Arc;

use super::tar::{EntryKind, TarEntry, TarError, TarReader};

/// Splits a member path into (key, extension); `None` when the base name has no dot after its first character.
pub fn split_key(path: &str) -> Option<(&str, &str)> {
    let base_start = path.rfind('/').map_or(0, |i| i + 1);
    let dot = path[base_start..].find('.')?;
    if dot == 0 {
        return None;
    }
    let dot = base_start + dot;
    Some((&path[..dot], &path[dot + 1..]))
}

/// WebDataset skips metadata members such as `__index__` or `__meta__/x` at the top of the archive.
fn is_meta(path: &str) -> bool {
    let first = path.split('/').next().unwrap_or(path);
    first.len() >= 4 && first.starts_with("__") && first.ends_with("__")
}

/// The members of one sample, still encoded.
#[derive(Debug, Clone)]
pub struct RawSample {
    /// Name of the shard it came from (for messages).
    pub shard: Arc<str>,
    pub key: String,
    /// Byte offset of the sample's first member header in the shard.
    pub offset: u64,
    /// Members whose extension the reader was asked to keep: (lower-case extension, data).
    pub members: Vec<(String, Vec<u8>)>,
    /// Extensions of members present but not kept (only their names are read).
    pub other_exts: Vec<String>,
    /// A problem found while grouping (a duplicate member); the sample is bad.
    pub problem: Option<String>,
}

impl RawSample {
    pub fn member(&self, ext: &str) -> Option<&[u8]> {
        self.members.iter().find(|(e, _)| e == ext).map(|(_, d)| d.as_slice())
    }

    /// Every extension present, kept or not, for messages about missing members.
    pub fn all_exts(&self) -> Vec<&str> {
        self.members.iter().map(|(e, _)| e.as_str()).chain(self.other_exts.iter().map(String::as_str)).collect()
    }
}

/// What a shard yields: samples, then possibly one error that ended the shard early.
#[derive(Debug)]
pub enum ShardItem {
    Sample(RawSample),
    /// The shard is damaged from this point on; everything before it was yielded.
    Damaged(TarError),
}

/// Streams the samples of one shard.
pub struct SampleReader<R> {
    tar: TarReader<R>,
    shard: Arc<str>,
    keep: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    current: Option<RawSample>,
    queued_error: Option<TarError>,
    done: bool,
}

impl<R: Read> SampleReader<R> {
    /// `keep(ext)` says which members' data to read; the others are skipped over without being stored.
    pub fn new(reader: R, shard: Arc<str>, keep: Arc<dyn Fn(&str) -> bool + Send + Sync>) -> Self {
        SampleReader { tar: TarReader::new(reader), shard, keep, current: None, queued_error: None, done: false }
    }

    pub fn shard_name(&self) -> Arc<str> {
        self.shard.clone()
    }

    /// Bytes of the shard consumed so far.
    pub fn offset(&self) -> u64 {
        self.tar.offset()
    }

    /// Adds one member to the sample in progress; returns the previous sample when this member starts a new one.
    fn add_member(&mut self, entry: &TarEntry) -> Result<Option<RawSample>, TarError> {
        let path = entry.path.as_str();
        let Some((key, ext)) = split_key(path) else {
            return Ok(None);
        };
        let ext = ext.to_lowercase();
        // Read first: if the data is cut off, the sample in progress stays whole and is reported before the damage.
        let data = if (self.keep)(&ext) { Some(self.tar.read_data(entry)?) } else { None };
        let mut finished = None;
        let cur = match &mut self.current {
            Some(cur) if cur.key == key => cur,
            slot => {
                finished = slot.take();
                slot.insert(RawSample {
                    shard: self.shard.clone(),
                    key: key.to_string(),
                    offset: entry.header_offset,
                    members: Vec::new(),
                    other_exts: Vec::new(),
                    problem: None,
                })
            }
        };
        if cur.members.iter().any(|(e, _)| *e == ext) || cur.other_exts.contains(&ext) {
            if cur.problem.is_none() {
                cur.problem = Some(format!("duplicate member '{path}'"));
            }
        } else if let Some(data) = data {
            cur.members.push((ext, data));
        } else {
            cur.other_exts.push(ext);
        }
        Ok(finished)
    }
}

impl<R: Read> Iterator for SampleReader<R> {
    type Item = ShardItem;

    fn next(&mut self) -> Option<ShardItem> {
        loop {
            if self.done {
                // The sample in progress when the shard ended (cleanly or not) comes before the error. A sample cut
                // off inside its first member was never started (`add_member` reads before grouping).
                if let Some(sample) = self.current.take() {
                    return Some(ShardItem::Sample(sample));
                }
                return self.queued_error.take().map(ShardItem::Damaged);
            }
            let entry = match self.tar.next_entry() {
                Ok(Some(entry)) => entry,
                Ok(None) => {
                    self.done = true;
                    continue;
                }
                Err(err) => {
                    self.done = true;
                    self.queued_error = Some(err);
                    continue;
                }
            };
            if entry.kind != EntryKind::File || is_meta(&entry.path) {
                continue;
            }
            match self.add_member(&entry) {
                Ok(Some(finished)) => return Some(ShardItem::Sample(finished)),
                Ok(None) => {}
                Err(err) => {
                    self.done = true;
                    self.queued_error = Some(err);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tar::TarWriter;
    use super::*;

    #[test]
    fn keys_split_at_first_dot_of_base_name() {
        assert_eq!(split_key("dir/a.b.c.jpg"), Some(("dir/a", "b.c.jpg")));
        assert_eq!(split_key("a.jpg"), Some(("a", "jpg")));
        assert_eq!(split_key("d.x/a.png"), Some(("d.x/a", "png")));
        assert_eq!(split_key("noext"), None);
        assert_eq!(split_key("dir/.hidden"), None);
        assert_eq!(split_key("dir/"), None);
    }

    #[test]
    fn meta_members_are_recognised() {
        assert!(is_meta("__index__"));
        assert!(is_meta("__meta__/x.json"));
        assert!(!is_meta("a/__x__.json"));
        assert!(!is_meta("__a.jpg"));
    }

    fn shard(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        for (p, d) in members {
            w.append(p, d).unwrap();
        }
        w.finish().unwrap()
    }

    fn samples(bytes: &[u8]) -> Vec<ShardItem> {
        let keep: Arc<dyn Fn(&str) -> bool + Send + Sync> = Arc::new(|e: &str| e != "cls");
        SampleReader::new(bytes, "s.tar".into(), keep).collect()
    }

    #[test]
    fn consecutive_members_group_and_duplicates_are_flagged() {
        let bytes = shard(&[
            ("a.jpg", b"1"),
            ("a.TXT", b"2"),
            ("a.cls", b"3"),
            ("b.jpg", b"4"),
            ("b.jpg", b"5"),
            ("readme", b"no dot"),
            ("a.png", b"6"),
        ]);
        let items = samples(&bytes);
        assert_eq!(items.len(), 3);
        let ShardItem::Sample(a) = &items[0] else { panic!("{:?}", items[0]) };
        assert_eq!(a.key, "a");
        assert_eq!(a.member("jpg"), Some(&b"1"[..]));
        assert_eq!(a.member("txt"), Some(&b"2"[..]));
        assert_eq!(a.other_exts, ["cls"]);
        assert!(a.problem.is_none());
        let ShardItem::Sample(b) = &items[1] else { panic!() };
        assert!(b.problem.as_deref().unwrap().contains("duplicate member 'b.jpg'"));
        // A key that comes back later is a new sample, as in WebDataset.
        let ShardItem::Sample(a2) = &items[2] else { panic!() };
        assert_eq!((a2.key.as_str(), a2.members.len()), ("a", 1));
    }

    #[test]
    fn damage_yields_pending_sample_then_error() {
        let bytes = shard(&[("a.jpg", &[1u8; 600]), ("a.txt", b"t"), ("b.jpg", &[2u8; 600]), ("b.txt", b"u")]);
        // Cut inside b.txt's header: a is whole, b has its jpg only.
        let cut = 512 + 1024 + 512 + 512 + 512 + 1024 + 100;
        let items = samples(&bytes[..cut]);
        assert_eq!(items.len(), 3);
        assert!(matches!(&items[0], ShardItem::Sample(s) if s.key == "a" && s.members.len() == 2));
        assert!(matches!(&items[1], ShardItem::Sample(s) if s.key == "b" && s.members.len() == 1));
        assert!(matches!(&items[2], ShardItem::Damaged(e) if e.offset == cut as u64));
        // Cut inside b.jpg's data: b has no member at all, so only the damage is reported.
        let items = samples(&bytes[..2560 + 512 + 100]);
        assert_eq!(items.len(), 2);
        assert!(matches!(&items[0], ShardItem::Sample(s) if s.key == "a"));
        assert!(matches!(&items[1], ShardItem::Damaged(e) if e.msg.contains("'b.jpg'")));
    }
}
