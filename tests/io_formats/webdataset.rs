//! WebDataset shards end to end: real tar files (ours, the `tar` crate's, Python webdataset's), damaged ones,
//! grouping, shard patterns, the loader's determinism, partitioning and resumption, `check` and `make`.

use std::collections::BTreeSet;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{ImageFormat, Rgb, RgbImage};
use zeroconv::io::data::check::{check_shards, CheckReport};
use zeroconv::io::data::make::{make_shards, MakeOptions};
use zeroconv::io::data::shards::resolve_shards;
use zeroconv::io::data::tar::{TarReader, TarWriter};
use zeroconv::io::data::{Fields, Loader, LoaderConfig, LoaderState, SplitMode};

/// A fresh, empty, uniquely named folder, removed when the test ends (tests and test runs never share one).
struct Scratch(tempfile::TempDir);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

fn scratch(name: &str) -> Scratch {
    Scratch(tempfile::Builder::new().prefix(&format!("zeroconv-wds-{name}-")).tempdir().unwrap())
}

fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A small image whose colour encodes `n`, so samples can be told apart after decoding.
fn picture(n: usize) -> RgbImage {
    RgbImage::from_fn(32, 24, |x, y| Rgb([(n * 7 % 256) as u8, (x * 8) as u8, (y * 10) as u8]))
}

/// The three members of sample `n`: `KEY.jpg`, `KEY.png`, `KEY.txt`.
fn members(n: usize) -> Vec<(String, Vec<u8>)> {
    let img = picture(n);
    vec![
        ("jpg".into(), encode(&img, ImageFormat::Jpeg)),
        ("png".into(), encode(&img, ImageFormat::Png)),
        ("txt".into(), format!("caption {n}").into_bytes()),
    ]
}

/// Writes `count` samples with keys `s{first..}` into one shard with our writer.
fn write_shard(path: &Path, first: usize, count: usize) {
    let mut w = TarWriter::new(std::fs::File::create(path).unwrap());
    for n in first..first + count {
        for (ext, data) in members(n) {
            w.append(&format!("s{n:05}.{ext}"), &data).unwrap();
        }
    }
    w.finish().unwrap();
}

/// `shards` shards of `per_shard` samples: `dir/shard-000000.tar`, ...
fn write_dataset(dir: &Path, shards: usize, per_shard: usize) -> Vec<PathBuf> {
    (0..shards)
        .map(|i| {
            let path = dir.join(format!("shard-{i:06}.tar"));
            write_shard(&path, i * per_shard, per_shard);
            path
        })
        .collect()
}

fn small_config() -> LoaderConfig {
    LoaderConfig { width: 16, height: 16, shuffle_buffer: 8, threads: 2, warn_first: 0, ..LoaderConfig::default() }
}

fn check(paths: &[&Path]) -> CheckReport {
    let specs: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    check_shards(&specs, &Fields::default(), 2, false).unwrap()
}

fn keys_of_epoch(loader: &Loader, epoch: u64) -> Vec<String> {
    let state = LoaderState { epoch, consumed: 0, ..loader.initial_state() };
    loader.stream_epoch(&state).unwrap().map(|s| s.unwrap().key).collect()
}

/// Header offsets of every member, from our reader.
fn member_offsets(bytes: &[u8]) -> Vec<(String, u64)> {
    let mut r = TarReader::new(bytes);
    let mut out = Vec::new();
    while let Some(e) = r.next_entry().unwrap() {
        out.push((e.path.clone(), e.header_offset));
    }
    out
}

#[test]
fn python_webdataset_shard_is_read() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webdataset/python-tarwriter.tar");
    let report = check(&[&fixture]);
    assert_eq!((report.shards, report.samples, report.bad, report.damaged_shards), (1, 3, 1, 0), "{report:?}");
    assert_eq!(report.errors.len(), 1);
    assert!(report.errors[0].contains("python-tarwriter.tar") && report.errors[0].contains("'000003'"));
    assert!(report.errors[0].contains("no control map member"), "{}", report.errors[0]);
    assert_eq!(report.image_sizes.get("8x6"), Some(&3));

    let config = LoaderConfig { shuffle_buffer: 0, shuffle_shards: false, ..small_config() };
    let loader = Loader::new(vec![fixture], config).unwrap();
    let samples: Vec<_> = loader.stream_epoch(&loader.initial_state()).unwrap().map(|s| s.unwrap()).collect();
    let keys: Vec<&str> = samples.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["000000", "dir/000001", &"k".repeat(120)]);
    assert_eq!(samples[1].caption, "café ☕");
    // The PNG control map is pure green: [0, 1, 0] after normalisation.
    let plane = 16 * 16;
    let control = &samples[0].control.data;
    assert!(control[..plane].iter().all(|&v| v == 0.0) && control[plane..2 * plane].iter().all(|&v| v == 1.0));
}

#[test]
fn tar_crate_gnu_long_names_pax_and_directories() {
    let dir = scratch("tar-crate");
    let path = dir.join("gnu.tar");
    let mut builder = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let long_dir = format!("{}/", "d".repeat(110));
    let add = |b: &mut tar::Builder<std::fs::File>, name: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        b.append_data(&mut header, name, data).unwrap();
    };
    let mut dir_header = tar::Header::new_gnu();
    dir_header.set_entry_type(tar::EntryType::Directory);
    dir_header.set_size(0);
    dir_header.set_cksum();
    builder.append_data(&mut dir_header, "train/", &[][..]).unwrap();
    // Keys with several dots: `train/0001.hint.png` is key `train/0001`, extension `hint.png`.
    let m = members(1);
    add(&mut builder, "train/0001.jpg", &m[0].1);
    add(&mut builder, "train/0001.hint.png", &m[1].1);
    add(&mut builder, "train/0001.seg.png", b"not used");
    add(&mut builder, "train/0001.txt", &m[2].1);
    // A path over 100 bytes: the tar crate writes a GNU `././@LongLink` entry for it.
    let m = members(2);
    for (ext, data) in &m {
        let ext = if ext == "png" { "hint.png" } else { ext.as_str() };
        add(&mut builder, &format!("{long_dir}0002.{ext}"), data);
    }
    // A pax extended header carrying the path.
    let m = members(3);
    for (ext, data) in &m {
        let ext = if ext == "png" { "hint.png" } else { ext.as_str() };
        let pax_path = format!("pax/{}.{ext}", "p".repeat(120));
        builder.append_pax_extensions([("path", pax_path.as_bytes())]).unwrap();
        add(&mut builder, "placeholder.bin", data);
    }
    builder.into_inner().unwrap();

    let fields = Fields { control: vec!["hint.png".into()], ..Fields::default() };
    let report = check_shards(&[path.display().to_string()], &fields, 1, false).unwrap();
    assert_eq!((report.samples, report.bad, report.damaged_shards), (3, 0, 0), "{report:?}");

    let config = LoaderConfig { fields, shuffle_buffer: 0, shuffle_shards: false, ..small_config() };
    let loader = Loader::new(vec![path], config).unwrap();
    let keys = keys_of_epoch(&loader, 0);
    assert_eq!(keys, ["train/0001".to_string(), format!("{long_dir}0002"), format!("pax/{}", "p".repeat(120))]);
}

#[test]
fn truncated_mid_member_keeps_earlier_samples_and_names_offset() {
    let dir = scratch("trunc-member");
    let whole = dir.join("whole.tar");
    write_shard(&whole, 0, 5);
    let bytes = std::fs::read(&whole).unwrap();
    let offsets = member_offsets(&bytes);
    // Cut 200 bytes into the data of sample 2's PNG (its header is 512 bytes long).
    let (_, png_header) = offsets.iter().find(|(p, _)| p == "s00002.png").unwrap().clone();
    let cut = png_header as usize + 512 + 200;
    let damaged = dir.join("damaged.tar");
    std::fs::write(&damaged, &bytes[..cut]).unwrap();

    let report = check(&[&damaged]);
    assert_eq!((report.samples, report.bad, report.damaged_shards), (2, 1, 1), "{report:?}");
    let shard_error = report.errors.iter().find(|e| e.contains("truncated")).unwrap();
    assert!(shard_error.contains("damaged.tar"), "{shard_error}");
    assert!(shard_error.contains(&format!("at byte {cut}")) && shard_error.contains("s00002.png"), "{shard_error}");
    assert!(report.errors.iter().any(|e| e.contains("'s00002'") && e.contains("no control map member")));
}

#[test]
fn truncated_mid_header_and_garbage_header() {
    let dir = scratch("trunc-header");
    let whole = dir.join("whole.tar");
    write_shard(&whole, 0, 5);
    let bytes = std::fs::read(&whole).unwrap();
    let offsets = member_offsets(&bytes);
    let (_, header) = offsets.iter().find(|(p, _)| p == "s00003.jpg").unwrap().clone();

    let mid_header = dir.join("mid-header.tar");
    std::fs::write(&mid_header, &bytes[..header as usize + 100]).unwrap();
    let report = check(&[&mid_header]);
    assert_eq!((report.samples, report.bad, report.damaged_shards), (3, 0, 1), "{report:?}");
    let error = &report.errors[0];
    assert!(error.contains("mid-header.tar") && error.contains(&format!("at byte {}", header + 100)), "{error}");
    assert!(error.contains(&format!("header that starts at byte {header}")), "{error}");

    let mut garbled = bytes.clone();
    garbled[header as usize..header as usize + 512].fill(b'#');
    let garbage = dir.join("garbage.tar");
    std::fs::write(&garbage, &garbled).unwrap();
    let report = check(&[&garbage]);
    assert_eq!((report.samples, report.damaged_shards), (3, 1), "{report:?}");
    assert!(
        report.errors[0].contains(&format!("garbage.tar: at byte {header}: corrupt tar header")),
        "{:?}",
        report.errors
    );
}

#[test]
fn non_tar_missing_shard_and_missing_members() {
    let dir = scratch("non-tar");
    let text = dir.join("notes.tar");
    std::fs::write(&text, "this is not a tar file at all\n".repeat(40)).unwrap();
    let partial = dir.join("partial.tar");
    let mut w = TarWriter::new(std::fs::File::create(&partial).unwrap());
    let m = members(0);
    w.append("a.jpg", &m[0].1).unwrap();
    w.append("a.png", &m[1].1).unwrap(); // no caption
    w.append("b.png", &m[1].1).unwrap();
    w.append("b.txt", b"no image").unwrap();
    w.append("c.jpg", b"\xff\xd8\xff\xe0 broken jpeg").unwrap();
    w.append("c.png", &m[1].1).unwrap();
    w.append("c.txt", b"bad image").unwrap();
    w.finish().unwrap();
    let missing = dir.join("missing.tar");

    let report = check(&[&text, &partial, &missing]);
    assert_eq!((report.shards, report.samples, report.bad, report.damaged_shards), (2, 0, 3, 2), "{report:?}");
    let all = report.errors.join("\n");
    assert!(all.contains("missing.tar: shard not found"), "{all}");
    assert!(all.contains("notes.tar: at byte 0: not a tar archive"), "{all}");
    assert!(all.contains("partial.tar: sample 'a'") && all.contains("no caption member"), "{all}");
    assert!(all.contains("partial.tar: sample 'b'") && all.contains("no image member"), "{all}");
    assert!(all.contains("partial.tar: sample 'c'") && all.contains("image 'c.jpg' does not decode"), "{all}");
}

#[test]
fn check_json_has_the_promised_fields() {
    let dir = scratch("check-json");
    let shards = write_dataset(&dir, 2, 3);
    let pattern = dir.join("shard-{000000..000001}.tar").display().to_string();
    let report = check_shards(&[pattern], &Fields::default(), 0, false).unwrap();
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["shards"], 2);
    assert_eq!(json["samples"], 6);
    assert_eq!(json["bad"], 0);
    assert_eq!(json["errors"], serde_json::json!([]));
    assert_eq!(json["image_sizes"]["32x24"], 6);
    assert!(json["bytes"].as_u64().unwrap() > 0);
    assert_eq!(shards.len(), 2);
}

#[test]
fn brace_patterns_and_directories_resolve_to_files() {
    let dir = scratch("patterns");
    let shards = write_dataset(&dir, 3, 1);
    std::fs::write(dir.join("notes.txt"), "not a shard").unwrap();
    let pattern = dir.join("shard-{000000..000002}.tar").display().to_string();
    assert_eq!(resolve_shards(&[pattern]).unwrap(), shards);
    assert_eq!(resolve_shards(&[dir.display().to_string()]).unwrap(), shards);
    let list = dir.join("shard-00000{2,0}.tar").display().to_string();
    assert_eq!(resolve_shards(&[list]).unwrap(), vec![shards[2].clone(), shards[0].clone()]);
    let too_far = dir.join("shard-{000000..000003}.tar").display().to_string();
    let err = resolve_shards(&[too_far]).unwrap_err().to_string();
    assert!(err.contains("shard-000003.tar: shard not found"), "{err}");
}

#[test]
fn shuffle_is_deterministic_per_seed_and_independent_of_threads() {
    let dir = scratch("determinism");
    let shards = write_dataset(&dir, 3, 12);
    let all: BTreeSet<String> = (0..36).map(|n| format!("s{n:05}")).collect();
    let order = |seed: u64, threads: usize, epoch: u64| {
        let config = LoaderConfig { seed, threads, shuffle_buffer: 10, ..small_config() };
        keys_of_epoch(&Loader::new(shards.clone(), config).unwrap(), epoch)
    };
    let base = order(7, 1, 0);
    assert_eq!(base.iter().cloned().collect::<BTreeSet<_>>(), all, "an epoch visits every sample once");
    assert_eq!(base.len(), 36);
    assert_eq!(order(7, 4, 0), base, "thread count must not change the order");
    assert_eq!(order(7, 2, 0), base);
    assert_ne!(order(8, 1, 0), base, "another seed gives another order");
    let next_epoch = order(7, 1, 1);
    assert_ne!(next_epoch, base, "reshuffled every epoch");
    assert_eq!(next_epoch.into_iter().collect::<BTreeSet<_>>(), all);
    let sorted: Vec<String> = all.iter().cloned().collect();
    assert_ne!(base, sorted, "the samples are actually shuffled");
}

#[test]
fn ranks_and_workers_partition_the_samples_exactly() {
    let dir = scratch("partition");
    let shards = write_dataset(&dir, 6, 5);
    let all: BTreeSet<String> = (0..30).map(|n| format!("s{n:05}")).collect();
    for split in [SplitMode::Shards, SplitMode::Samples] {
        for epoch in [0, 1] {
            let mut union = BTreeSet::new();
            let mut total = 0;
            for rank in 0..2 {
                for worker in 0..2 {
                    let config =
                        LoaderConfig { rank, world_size: 2, worker, num_workers: 2, split, seed: 3, ..small_config() };
                    let keys = keys_of_epoch(&Loader::new(shards.clone(), config).unwrap(), epoch);
                    assert!(!keys.is_empty(), "{split:?} rank {rank} worker {worker}");
                    total += keys.len();
                    union.extend(keys);
                }
            }
            assert_eq!(total, 30, "{split:?}: no sample twice");
            assert_eq!(union, all, "{split:?}: every sample once");
        }
    }
    // Splitting by shards needs enough shards; the error says so instead of leaving partitions empty.
    let config = LoaderConfig { world_size: 8, ..small_config() };
    let err = Loader::new(shards[..3].to_vec(), config).err().unwrap().to_string();
    assert!(err.contains("3 shards cannot be split among 8 partitions"), "{err}");
}

/// A dataset of 4 shards, 20 good samples and one whose image is not a JPEG (`s00007`, in the middle shard).
fn dataset_with_a_bad_sample(dir: &Path) -> Vec<PathBuf> {
    let mut shards = write_dataset(dir, 3, 6);
    let path = dir.join("shard-000003.tar");
    let mut w = TarWriter::new(std::fs::File::create(&path).unwrap());
    for n in 18..20 {
        for (ext, data) in members(n) {
            w.append(&format!("s{n:05}.{ext}"), &data).unwrap();
        }
    }
    for (ext, data) in members(7) {
        let data = if ext == "jpg" { b"not a jpeg".to_vec() } else { data };
        w.append(&format!("bad{:05}.{ext}", 7), &data).unwrap();
    }
    w.finish().unwrap();
    shards.push(path);
    shards
}

/// The epoch's samples and the loader's stats once the epoch is drained: every item a bounded stream decodes is
/// handed out, so `samples + bad` is what the stream decoded.
fn drain_epoch(loader: &Loader, epoch: u64) -> (Vec<zeroconv::io::data::Sample>, u64, u64) {
    let state = LoaderState { epoch, consumed: 0, ..loader.initial_state() };
    let mut stream = loader.stream_epoch(&state).unwrap();
    let samples: Vec<_> = stream.by_ref().map(|s| s.unwrap()).collect();
    (samples, stream.stats().samples, stream.stats().bad)
}

#[test]
fn data_parallel_ranks_decode_only_their_stride_of_one_process_stream() {
    let dir = scratch("stride");
    let shards = dataset_with_a_bad_sample(&dir);
    let one = LoaderConfig { seed: 5, flip_prob: 0.5, shuffle_buffer: 6, ..small_config() };
    let strided = |rank, world_size, worker, num_workers| LoaderConfig {
        rank,
        world_size,
        worker,
        num_workers,
        split: SplitMode::Samples,
        ..one.clone()
    };
    for epoch in [0, 1] {
        let (whole, good, bad) = drain_epoch(&Loader::new(shards.clone(), one.clone()).unwrap(), epoch);
        assert_eq!((good, bad), (20, 1));
        assert!(whole.iter().all(|s| s.global_index == s.index));
        assert!(whole.iter().any(|s| s.flipped) && whole.iter().any(|s| !s.flipped));
        // Where the bad sample sits in the whole stream: the good ones around it are numbered past it.
        let positions: BTreeSet<u64> = whole.iter().map(|s| s.global_index).collect();
        let bad_at = (0..21).find(|i| !positions.contains(i)).unwrap();
        for world in [2u64, 3] {
            let mut seen = 0;
            for rank in 0..world {
                let loader = Loader::new(shards.clone(), strided(rank as usize, world as usize, 0, 1)).unwrap();
                let (mine, good, bad) = drain_epoch(&loader, epoch);
                let want: Vec<_> = whole.iter().filter(|s| s.global_index % world == rank).collect();
                // Its stride of one process's stream, in order, with the same pixels and flips ...
                assert_eq!(mine.len(), want.len(), "epoch {epoch}, rank {rank} of {world}");
                for (k, (a, b)) in mine.iter().zip(&want).enumerate() {
                    assert_eq!((&a.key, a.global_index, a.flipped), (&b.key, b.global_index, b.flipped));
                    assert_eq!(a.image.data, b.image.data);
                    assert_eq!(a.control.data, b.control.data);
                    assert_eq!(
                        a.index,
                        mine[..k].len() as u64 + u64::from(bad_at % world == rank && bad_at < a.global_index)
                    );
                }
                // ... and nothing else decoded: its share of the 21 items, the bad one only by its owner.
                let owned = (0..21).filter(|i| i % world == rank).count() as u64;
                assert_eq!((good + bad, bad), (owned, u64::from(bad_at % world == rank)));
                seen += good;
            }
            assert_eq!(seen, 20);
        }
        // Workers split their rank's stride among them: worker w of rank r takes its items i with (i / 2) % 2 == w.
        for rank in 0..2u64 {
            let mut keys = BTreeSet::new();
            for worker in 0..2 {
                let loader = Loader::new(shards.clone(), strided(rank as usize, 2, worker, 2)).unwrap();
                let (mine, _, _) = drain_epoch(&loader, epoch);
                assert!(mine.iter().all(|s| s.global_index % 2 == rank && (s.global_index / 2) % 2 == worker as u64));
                keys.extend(mine.into_iter().map(|s| s.key));
            }
            let want: BTreeSet<String> =
                whole.iter().filter(|s| s.global_index % 2 == rank).map(|s| s.key.clone()).collect();
            assert_eq!(keys, want);
        }
    }
}

#[test]
fn rank_positions_map_onto_another_rank_count_only_when_they_mark_one_point() {
    let dir = scratch("stride-resume");
    let shards = write_dataset(&dir, 2, 8);
    let one = LoaderConfig { seed: 9, shuffle_buffer: 4, ..small_config() };
    let rank = |r: usize, w: usize| {
        Loader::new(shards.clone(), LoaderConfig { rank: r, world_size: w, split: SplitMode::Samples, ..one.clone() })
            .unwrap()
    };
    let whole: Vec<String> = keys_of_epoch(&Loader::new(shards.clone(), one.clone()).unwrap(), 0);
    // Two ranks that each consumed 3 of their own: together the first 6 items.
    let saved: Vec<LoaderState> = (0..2).map(|r| LoaderState { consumed: 3, ..rank(r, 2).initial_state() }).collect();
    assert!(saved.iter().all(|s| LoaderState::from_json(&s.to_json()).unwrap() == *s));
    for world in [1usize, 2, 3] {
        for r in 0..world {
            let loader = rank(r, world);
            let state = loader.resume_state(&saved).unwrap();
            let rest: Vec<String> = loader.stream_epoch(&state).unwrap().map(|s| s.unwrap().key).collect();
            let want: Vec<String> =
                whole.iter().enumerate().filter(|(i, _)| *i >= 6 && i % world == r).map(|(_, k)| k.clone()).collect();
            assert_eq!(rest, want, "rank {r} of {world} continues the stream at item 6");
        }
    }
    // One process's position (as it saves it, without stride fields) maps onto two ranks.
    let single = Loader::new(shards.clone(), one.clone()).unwrap();
    let at5 = LoaderState { consumed: 5, ..single.initial_state() };
    assert!(!at5.to_json().contains("part"), "{}", at5.to_json());
    let state = rank(1, 2).resume_state(&[at5]).unwrap();
    assert_eq!((state.part, state.parts, state.consumed), (1, 2, 2), "items 1 and 3 are consumed, 5 is next");
    // Rank 1 skipped ahead (its 4th item is read while rank 0's 4th, item 6, is not): refused, naming both.
    let apart = [LoaderState { consumed: 3, ..saved[0] }, LoaderState { consumed: 4, ..saved[1] }];
    let err = single.resume_state(&apart).unwrap_err().to_string();
    assert!(err.contains("2 ranks") && err.contains("item 3 of epoch 0, item 4 of epoch 0"), "{err}");
    assert!(err.contains("resume with 2"), "{err}");
    // Each rank's own position is taken as it is when the rank count is the same, and checked against the rank.
    assert_eq!(rank(1, 2).resume_state(&apart).unwrap(), apart[1]);
    let err = rank(0, 2).stream(&apart[1]).err().unwrap().to_string();
    assert!(err.contains("stride 1 of 2") && err.contains("stride 0 of 2"), "{err}");
}

#[test]
fn resuming_from_a_saved_state_continues_bit_exactly() {
    let dir = scratch("resume");
    let shards = write_dataset(&dir, 2, 7);
    let config = LoaderConfig { seed: 11, flip_prob: 0.5, shuffle_buffer: 5, ..small_config() };
    let loader = Loader::new(shards.clone(), config.clone()).unwrap();
    // 14 samples per epoch: run 30 samples straight through (crossing two epoch boundaries).
    let straight: Vec<_> = loader.stream(&loader.initial_state()).unwrap().take(30).map(|s| s.unwrap()).collect();
    assert!(straight.iter().any(|s| s.flipped) && straight.iter().any(|s| !s.flipped));
    for stop in [0, 5, 14, 20] {
        let mut first = loader.stream(&loader.initial_state()).unwrap();
        for _ in 0..stop {
            first.next().unwrap().unwrap();
        }
        let saved = first.state().to_json();
        drop(first);
        // A new loader (as after a restart) from the saved JSON.
        let again = Loader::new(shards.clone(), config.clone()).unwrap();
        let state = LoaderState::from_json(&saved).unwrap();
        let rest: Vec<_> = again.stream(&state).unwrap().take(30 - stop).map(|s| s.unwrap()).collect();
        for (a, b) in straight[stop..].iter().zip(&rest) {
            assert_eq!((&a.key, a.epoch, a.index, a.flipped), (&b.key, b.epoch, b.index, b.flipped), "stop {stop}");
            assert_eq!(a.image.data, b.image.data);
            assert_eq!(a.control.data, b.control.data);
        }
        assert_eq!(rest.len(), 30 - stop);
    }
    // The same shards in another folder: the state still applies.
    let moved = scratch("resume-moved");
    let moved_shards: Vec<PathBuf> = shards
        .iter()
        .map(|p| {
            let to = moved.join(p.file_name().unwrap());
            std::fs::copy(p, &to).unwrap();
            to
        })
        .collect();
    let relocated = Loader::new(moved_shards, config.clone()).unwrap();
    let mut stream = relocated.stream(&LoaderState { consumed: 3, ..loader.initial_state() }).unwrap();
    assert_eq!(stream.next().unwrap().unwrap().key, straight[3].key);
    drop(stream);

    let saved = loader.initial_state().to_json();
    assert!(
        saved.contains("\"epoch\":0") && saved.contains("\"consumed\":0") && saved.contains("\"version\":1"),
        "{saved}"
    );
    let future = LoaderState { version: 99, ..loader.initial_state() };
    assert!(loader.stream(&future).err().unwrap().to_string().contains("version 99"));
    let other = Loader::new(shards, LoaderConfig { seed: 12, ..config }).unwrap();
    let err = other.stream(&loader.initial_state()).err().unwrap().to_string();
    assert!(err.contains("loader state was saved with other shards"), "{err}");
}

#[test]
fn outputs_are_chw_in_range_and_flip_mirrors_both() {
    let dir = scratch("values");
    let shards = write_dataset(&dir, 1, 2);
    let run = |flip_prob: f64| {
        let config = LoaderConfig { flip_prob, shuffle_buffer: 0, ..small_config() };
        let loader = Loader::new(shards.clone(), config).unwrap();
        loader.stream_epoch(&loader.initial_state()).unwrap().map(|s| s.unwrap()).collect::<Vec<_>>()
    };
    let plain = run(0.0);
    let flipped = run(1.0);
    for (a, b) in plain.iter().zip(&flipped) {
        assert!(!a.flipped && b.flipped);
        assert_eq!((a.image.height, a.image.width, a.image.data.len()), (16, 16, 3 * 256));
        assert!(a.image.data.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert!(a.control.data.iter().all(|v| (0.0..=1.0).contains(v)));
        for (x, y) in [(a, b), (b, a)] {
            for (plane_x, plane_y) in [(&x.image.data, &y.image.data), (&x.control.data, &y.control.data)] {
                for c in 0..3 {
                    for row in 0..16 {
                        for col in 0..16 {
                            let i = c * 256 + row * 16 + col;
                            let j = c * 256 + row * 16 + 15 - col;
                            assert_eq!(plane_x[i], plane_y[j]);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn strict_mode_stops_at_a_bad_sample_and_lenient_mode_counts_it() {
    let dir = scratch("strict");
    let path = dir.join("one-bad.tar");
    let mut w = TarWriter::new(std::fs::File::create(&path).unwrap());
    for (ext, data) in members(0) {
        w.append(&format!("good.{ext}"), &data).unwrap();
    }
    w.append("bad.jpg", b"nope").unwrap();
    w.finish().unwrap();
    let config = LoaderConfig { shuffle_buffer: 0, ..small_config() };
    let loader = Loader::new(vec![path.clone()], config.clone()).unwrap();
    let mut stream = loader.stream_epoch(&loader.initial_state()).unwrap();
    assert_eq!(stream.next().unwrap().unwrap().key, "good");
    assert!(stream.next().is_none());
    assert_eq!((stream.stats().samples, stream.stats().bad), (1, 1));
    assert!(stream.stats().first_problems[0].contains("one-bad.tar: sample 'bad'"));

    // Streaming epoch after epoch over data with nothing usable stops with an error instead of spinning.
    let only_bad = dir.join("only-bad.tar");
    let mut w = TarWriter::new(std::fs::File::create(&only_bad).unwrap());
    w.append("x.jpg", b"nope").unwrap();
    w.finish().unwrap();
    let hopeless = Loader::new(vec![only_bad], config.clone()).unwrap();
    let outcome: Vec<_> = hopeless.stream(&hopeless.initial_state()).unwrap().collect();
    assert_eq!(outcome.len(), 1);
    assert!(outcome[0].as_ref().err().unwrap().to_string().contains("epoch 0 yielded no usable sample"));

    let strict = Loader::new(vec![path], LoaderConfig { strict: true, ..config }).unwrap();
    let results: Vec<_> = strict.stream_epoch(&strict.initial_state()).unwrap().collect();
    assert_eq!(results.len(), 2);
    let err = results[1].as_ref().err().unwrap().to_string();
    assert!(err.contains("one-bad.tar: sample 'bad'") && err.contains("no control map member"), "{err}");
}

#[test]
fn batches_stack_samples() {
    let dir = scratch("batches");
    let shards = write_dataset(&dir, 1, 5);
    let loader = Loader::new(shards, small_config()).unwrap();
    let mut stream = loader.stream_epoch(&loader.initial_state()).unwrap();
    let first = stream.next_batch(2).unwrap().unwrap();
    assert_eq!((first.len(), first.images.len(), first.controls.len()), (2, 2 * 3 * 256, 2 * 3 * 256));
    assert_eq!(stream.next_batch(2).unwrap().unwrap().len(), 2);
    assert_eq!(stream.next_batch(2).unwrap().unwrap().len(), 1, "the epoch's remainder");
    assert!(stream.next_batch(2).is_none());
}

fn make_args(input: &Path, output: String, maxcount: usize) -> MakeOptions {
    MakeOptions {
        input: input.to_path_buf(),
        output,
        maxcount,
        maxsize: None,
        quality: 95,
        strict: false,
        force: false,
    }
}

#[test]
fn make_from_folder_then_check_round_trip() {
    let dir = scratch("make-folder");
    let input = dir.join("input");
    for sub in ["images", "controls", "captions"] {
        std::fs::create_dir_all(input.join(sub)).unwrap();
    }
    for n in 0..7 {
        let img = picture(n);
        // PNG targets are re-encoded as JPEG; the one with dots in its name gets a dot-free key.
        let name = if n == 3 { "img.v3".to_string() } else { format!("img{n}") };
        std::fs::write(input.join("images").join(format!("{name}.png")), encode(&img, ImageFormat::Png)).unwrap();
        std::fs::write(input.join("controls").join(format!("{name}.png")), encode(&img, ImageFormat::Png)).unwrap();
        std::fs::write(input.join("captions").join(format!("{name}.txt")), format!("caption {n}\n")).unwrap();
    }
    let out = dir.join("out");
    let report = make_shards(&make_args(&input, out.join("part-%03d.tar").display().to_string(), 3), false).unwrap();
    assert_eq!((report.samples, report.skipped, report.shards.len()), (7, 0, 3));
    let names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["part-000.tar", "part-001.tar", "part-002.tar"], "no temporary files left behind");

    let checked =
        check_shards(&[out.join("part-{000..002}.tar").display().to_string()], &Fields::default(), 1, false).unwrap();
    assert_eq!((checked.samples, checked.bad, checked.damaged_shards), (7, 0, 0), "{checked:?}");
    assert_eq!(checked.image_sizes.get("32x24"), Some(&7));
    let config = LoaderConfig { shuffle_buffer: 0, shuffle_shards: false, ..small_config() };
    let loader = Loader::new(report.shards.clone(), config).unwrap();
    let samples: Vec<_> = loader.stream_epoch(&loader.initial_state()).unwrap().map(|s| s.unwrap()).collect();
    let keys: Vec<&str> = samples.iter().map(|s| s.key.as_str()).collect();
    // Sorted by file name ("img.v3" sorts before "img0").
    assert_eq!(keys, ["img_v3", "img0", "img1", "img2", "img4", "img5", "img6"]);
    assert_eq!(samples[0].caption, "caption 3");
}

#[test]
fn make_from_fill50k_layout_skips_unreadable_inputs() {
    let dir = scratch("make-fill50k");
    let input = dir.join("fill50k");
    std::fs::create_dir_all(input.join("source")).unwrap();
    std::fs::create_dir_all(input.join("target")).unwrap();
    let mut lines = String::new();
    for n in 0..5 {
        let img = picture(n);
        if n != 2 {
            // Sample 2's target is missing on disk.
            std::fs::write(input.join(format!("target/{n}.png")), encode(&img, ImageFormat::Png)).unwrap();
        }
        std::fs::write(input.join(format!("source/{n}.png")), encode(&img, ImageFormat::Png)).unwrap();
        lines += &format!(
            "{{\"source\": \"source/{n}.png\", \"target\": \"target/{n}.png\", \"prompt\": \"circle {n}\"}}\n"
        );
    }
    std::fs::write(input.join("prompt.json"), lines).unwrap();
    let out = dir.join("shards");
    let args = make_args(&input, out.join("fill-%06d.tar").display().to_string(), 10);
    let report = make_shards(&args, false).unwrap();
    assert_eq!((report.samples, report.skipped, report.shards.len()), (4, 1, 1));
    assert!(report.skipped_reasons[0].contains("sample '2'") && report.skipped_reasons[0].contains("2.png"));
    let checked = check(&[&report.shards[0]]);
    assert_eq!((checked.samples, checked.bad), (4, 0));
    let strict = MakeOptions { strict: true, output: out.join("strict-%d.tar").display().to_string(), ..args };
    let err = make_shards(&strict, false).unwrap_err().to_string();
    assert!(err.contains("sample '2'"), "{err}");
    assert!(!out.join("strict-0.tar").exists(), "a failed make leaves no shard behind");
}

#[test]
fn our_writer_is_read_back_by_the_tar_crate() {
    let long = format!("{}/{}.jpg", "x".repeat(130), "y".repeat(90)); // prefix + name
    let longer = format!("{}.txt", "z".repeat(300)); // needs a pax path record
    let members: Vec<(String, Vec<u8>)> = vec![
        ("a.txt".into(), b"hello".to_vec()),
        (long, vec![1; 1000]),
        (longer, Vec::new()),
        ("e.bin".into(), vec![9; 512]),
    ];
    let mut w = TarWriter::new(Vec::new());
    for (path, data) in &members {
        w.append(path, data).unwrap();
    }
    let bytes = w.finish().unwrap();
    let mut archive = tar::Archive::new(&bytes[..]);
    let mut read = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        read.push((path, data));
    }
    assert_eq!(read, members);
}

#[test]
fn make_respects_maxsize() {
    let dir = scratch("make-maxsize");
    let input = dir.join("input");
    for sub in ["images", "controls", "captions"] {
        std::fs::create_dir_all(input.join(sub)).unwrap();
    }
    for n in 0..4 {
        let img = picture(n);
        std::fs::write(input.join(format!("images/{n}.jpg")), encode(&img, ImageFormat::Jpeg)).unwrap();
        std::fs::write(input.join(format!("controls/{n}.png")), encode(&img, ImageFormat::Png)).unwrap();
        std::fs::write(input.join(format!("captions/{n}.txt")), "c").unwrap();
    }
    let out = dir.join("out");
    let mut args = make_args(&input, out.join("s-%d.tar").display().to_string(), 100);
    args.maxsize = Some(1); // every sample exceeds it: one sample per shard
    let report = make_shards(&args, false).unwrap();
    assert_eq!(report.shards.len(), 4);
    for shard in &report.shards {
        assert_eq!(check(&[shard]).samples, 1);
    }
}
