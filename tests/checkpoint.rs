//! Checkpoint reading and writing against files written by real PyTorch (tests/fixtures/checkpoint, made by
//! scripts/make_checkpoint_fixtures.py) and against files damaged here on purpose.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use zeroconv::engine::HostTensor;
use zeroconv::graph::DType;
use zeroconv::io::checkpoint::{
    check_keys, write_atomically, write_safetensors, write_safetensors_to, Checkpoint, Format, TensorView,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint").join(name)
}

fn expected() -> Value {
    let text = fs::read_to_string(fixture("expected.json")).expect("expected.json is committed");
    serde_json::from_str(&text).expect("expected.json is JSON")
}

/// A uniquely named scratch directory, removed at the end of the test.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new(name: &str) -> Scratch {
        Scratch(tempfile::Builder::new().prefix(&format!("zeroconv-ckpt-{name}-")).tempdir().unwrap())
    }
    fn path(&self, file: &str) -> PathBuf {
        self.0.path().join(file)
    }
    fn write(&self, file: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(file);
        fs::write(&p, bytes).unwrap();
        p
    }
    fn files(&self) -> BTreeSet<String> {
        fs::read_dir(self.0.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    }
}

fn open_err(path: &Path) -> String {
    let err = Checkpoint::open(path).expect_err("a damaged file must not open").to_string();
    assert!(err.contains(&path.display().to_string()), "the error must name the file: {err}");
    err
}

fn dtype_name(d: DType) -> &'static str {
    d.name()
}

/// Every tensor PyTorch wrote comes back with its dtype, shape and every value (all exact in their dtype).
fn assert_matches_expected(ckpt: &Checkpoint, want: &Value) {
    let tensors = want["tensors"].as_object().unwrap();
    let want_keys: BTreeSet<&str> = tensors.keys().map(String::as_str).collect();
    let got_keys: BTreeSet<&str> = ckpt.keys().collect();
    assert_eq!(got_keys, want_keys, "{}", ckpt.path().display());
    for (key, t) in tensors {
        let view = ckpt.get(key).unwrap();
        assert_eq!(dtype_name(view.dtype), t["dtype"].as_str().unwrap(), "{key}");
        let shape: Vec<usize> = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(view.shape, shape, "{key}");
        assert_eq!(view.bytes.len(), view.numel() * view.dtype.size(), "{key}");
        let values: Vec<f64> = t["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let got = view.to_f64();
        assert_eq!(got.len(), values.len(), "{key}");
        for (i, (g, w)) in got.iter().zip(&values).enumerate() {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{key}[{i}]: got {g}, PyTorch wrote {w}");
        }
        let sum: f64 = got.iter().sum();
        assert!((sum - t["sum"].as_f64().unwrap()).abs() <= 1e-9 * sum.abs().max(1.0), "{key} sum");
        // The f32 path agrees with the f64 one.
        let f32s = ckpt.to_f32(key).unwrap();
        assert!(f32s.iter().zip(&got).all(|(a, b)| *a == *b as f32), "{key} as f32");
    }
    let skipped: BTreeSet<&str> = ckpt.skipped().keys().map(String::as_str).collect();
    let want_skipped: BTreeSet<&str> =
        want["skipped"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(skipped, want_skipped);
    if let Some(meta) = want.get("metadata").and_then(Value::as_object) {
        for (k, v) in meta {
            assert_eq!(ckpt.metadata().get(k).map(String::as_str), v.as_str(), "metadata {k}");
        }
    }
}

#[test]
fn reads_every_fixture_pytorch_wrote() {
    let expected = expected();
    for name in ["tiny.ckpt", "tiny_proto4.ckpt", "tiny.safetensors", "lightning.ckpt", "tiny.nemo", "tiny_gz.nemo"] {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_matches_expected(&ckpt, &expected[name]);
    }
    // The ZIP64 records of a checkpoint over 4 GB (v1-5-pruned.ckpt), on tiny.ckpt's entries
    // (scripts/make_zip64_fixture.py; torch.load reads it back identically).
    let ckpt = Checkpoint::open(&fixture("tiny_zip64.ckpt")).unwrap_or_else(|e| panic!("tiny_zip64.ckpt: {e}"));
    assert_matches_expected(&ckpt, &expected["tiny.ckpt"]);
}

#[test]
fn checkpoints_can_be_shared_between_loader_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Checkpoint>();
    assert_send_sync::<TensorView<'static>>();
}

#[test]
fn formats_are_recognised_by_content() {
    let format = |name: &str| Checkpoint::open(&fixture(name)).unwrap().format();
    assert_eq!(format("tiny.ckpt"), Format::TorchZip);
    assert_eq!(format("tiny.safetensors"), Format::Safetensors);
    assert_eq!(format("tiny.nemo"), Format::Nemo { compressed: false });
    assert_eq!(format("tiny_gz.nemo"), Format::Nemo { compressed: true });
    // The extension does not decide: a safetensors file named .ckpt still opens.
    let dir = Scratch::new("content");
    let renamed = dir.write("weights.ckpt", &fs::read(fixture("tiny.safetensors")).unwrap());
    assert_eq!(Checkpoint::open(&renamed).unwrap().format(), Format::Safetensors);
}

#[test]
fn contiguous_tensors_are_borrowed_from_the_mapping_and_strided_ones_copied() {
    let ckpt = Checkpoint::open(&fixture("tiny.ckpt")).unwrap();
    assert!(ckpt.is_mapped());
    for key in ["linear.weight", "wide.rows", "half.weight", "scalar", "param.weight"] {
        assert!(ckpt.get(key).unwrap().is_borrowed(), "{key} should be a slice of the mapping");
    }
    for key in ["linear.weight_t", "wide.cols"] {
        assert!(!ckpt.get(key).unwrap().is_borrowed(), "{key} is a strided view and must be made contiguous");
    }
    // The transpose shares linear.weight's storage: reading it must give the transposed matrix.
    let w = ckpt.to_f32("linear.weight").unwrap();
    let wt = ckpt.to_f32("linear.weight_t").unwrap();
    for i in 0..4 {
        for j in 0..3 {
            assert_eq!(wt[j * 4 + i], w[i * 3 + j]);
        }
    }
    let nemo = Checkpoint::open(&fixture("tiny.nemo")).unwrap();
    assert!(nemo.is_mapped() && nemo.get("model.betas").unwrap().is_borrowed());
    let gz = Checkpoint::open(&fixture("tiny_gz.nemo")).unwrap();
    assert!(!gz.is_mapped(), "a gzipped archive has to be decompressed");
}

#[test]
fn lightning_checkpoint_yields_its_state_dict_and_ignores_the_rest() {
    let ckpt = Checkpoint::open(&fixture("lightning.ckpt")).unwrap();
    let keys: Vec<&str> = ckpt.keys().collect();
    assert_eq!(keys, ["model.0.bias", "model.0.weight", "model.1.bias", "model.1.weight"]);
    assert_eq!(ckpt.metadata()["global_step"], "1234");
    assert_eq!(ckpt.metadata()["epoch"], "3");
    // The optimizer's exp_avg tensors and the unknown callback class did not leak in, nor break loading.
    assert!(ckpt.skipped().is_empty());
    assert_eq!(ckpt.shape("model.0.weight"), Some(&[2usize, 3][..]));
}

#[test]
fn nemo_archive_exposes_config_and_maps_keys_to_ldm_names() {
    let expected = expected();
    for name in ["tiny.nemo", "tiny_gz.nemo"] {
        let raw = Checkpoint::open(&fixture(name)).unwrap();
        assert_eq!(raw.config_yaml(), expected[name]["config"].as_str());
        let originals: BTreeMap<String, Vec<f64>> =
            raw.keys().map(|k| (k.to_string(), raw.get(k).unwrap().to_f64())).collect();
        let ldm = raw.into_ldm_keys().unwrap();
        let keys: Vec<&str> = ldm.keys().collect();
        assert_eq!(
            keys,
            [
                "betas",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                "control_model.input_hint_block.0.weight",
                "control_model.middle_block.0.in_layers.2.bias",
                "control_model.zero_convs.0.0.weight",
                "first_stage_model.encoder.conv_in.weight",
                "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
                "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
                "model.diffusion_model.input_blocks.1.0.out_layers.3.bias",
                "model.diffusion_model.out.2.weight",
            ],
            "{name}"
        );
        // Renaming moves names only: the values are those stored under the NeMo names.
        assert_eq!(
            ldm.to_f32("betas").unwrap(),
            originals["model.betas"].iter().map(|&x| x as f32).collect::<Vec<_>>()
        );
        let conv = ldm.get("model.diffusion_model.input_blocks.1.0.in_layers.2.weight").unwrap().to_f64();
        assert_eq!(conv, originals["model.model.diffusion_model.input_blocks.1.0.in_layers.1.weight"]);
    }
    // Other formats are left alone.
    let plain = Checkpoint::open(&fixture("tiny.ckpt")).unwrap().into_ldm_keys().unwrap();
    assert!(plain.contains("model.diffusion_model.input_blocks.0.0.weight"));
}

#[test]
fn missing_and_unreadable_keys_are_explained() {
    let ckpt = Checkpoint::open(&fixture("tiny.ckpt")).unwrap();
    let err = ckpt.to_f32("linear.weigth").unwrap_err().to_string();
    assert!(err.contains("no tensor 'linear.weigth'") && err.contains("nearest present key: 'linear.weight'"), "{err}");
    let err = ckpt.tensor("mask").unwrap_err().to_string();
    assert!(err.contains("'mask' cannot be read") && err.contains("bool"), "{err}");
    let unet = ckpt.prefixed("model.").prefixed("diffusion_model.");
    let keys: Vec<&str> = unet.keys().collect();
    assert_eq!(keys, ["input_blocks.0.0.bias", "input_blocks.0.0.weight"]);
    assert_eq!(
        unet.get("input_blocks.0.0.bias").unwrap().to_f32(),
        ckpt.to_f32("model.diffusion_model.input_blocks.0.0.bias").unwrap()
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Damaged files: one clear error naming the file, never a panic.

fn safetensors_file(header: &str, data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.resize(v.len() + data_len, 0);
    v
}

#[test]
fn truncated_safetensors_says_truncated() {
    let dir = Scratch::new("trunc-st");
    let good = fs::read(fixture("tiny.safetensors")).unwrap();
    let cut = dir.write("cut.safetensors", &good[..good.len() - 40]);
    let err = open_err(&cut);
    assert!(err.contains("truncated?") && err.contains("of tensor data"), "{err}");
    // Cut inside the header itself.
    let cut = dir.write("cut_header.safetensors", &good[..30]);
    let err = open_err(&cut);
    assert!(err.contains("the header says it is") && err.contains("truncated?"), "{err}");
    let tiny = dir.write("tiny.safetensors", &good[..5]);
    assert!(open_err(&tiny).contains("only 5 bytes"));
}

#[test]
fn bad_json_header_is_reported() {
    let dir = Scratch::new("json");
    let p = dir.write(
        "bad.safetensors",
        &safetensors_file(r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]"#, 8),
    );
    let err = open_err(&p);
    assert!(err.contains("not valid JSON"), "{err}");
}

#[test]
fn header_offsets_past_the_end_are_reported() {
    let dir = Scratch::new("offsets");
    let header = r#"{"big":{"dtype":"F32","shape":[1024,1024,2048],"data_offsets":[0,8589934592]}}"#;
    let p = dir.write("short.safetensors", &safetensors_file(header, 1_258_291));
    let err = open_err(&p);
    assert!(
        err.contains("describes 8.0 GiB of tensor data") && err.contains("only 1.2 MiB") && err.contains("truncated?"),
        "{err}"
    );
    let header = r#"{"a":{"dtype":"F16","shape":[4],"data_offsets":[0,6]}}"#;
    let err = open_err(&dir.write("mis.safetensors", &safetensors_file(header, 8)));
    assert!(err.contains("tensor 'a'") && err.contains("needs 8 bytes"), "{err}");
    let huge_len = [0xffu8; 16];
    let err = open_err(&dir.write("len.safetensors", &huge_len));
    assert!(err.contains("100 MB limit"), "{err}");
}

#[test]
fn truncated_zip_is_reported() {
    let dir = Scratch::new("trunc-zip");
    let good = fs::read(fixture("tiny.ckpt")).unwrap();
    for keep in [good.len() * 3 / 5, good.len() - 10, 100] {
        let p = dir.write("cut.ckpt", &good[..keep]);
        let err = open_err(&p);
        assert!(err.contains("damaged or truncated"), "cut to {keep}: {err}");
    }
}

#[test]
fn zip_missing_a_storage_record_is_reported() {
    // Re-pack tiny.ckpt without one storage record: the pickle refers to a storage that is not there.
    let dir = Scratch::new("no-storage");
    let mut src = zip::ZipArchive::new(fs::File::open(fixture("tiny.ckpt")).unwrap()).unwrap();
    let out_path = dir.path("holes.ckpt");
    let mut out = zip::ZipWriter::new(fs::File::create(&out_path).unwrap());
    for i in 0..src.len() {
        let f = src.by_index_raw(i).unwrap();
        if f.name().unwrap() != "archive/data/0" {
            out.raw_copy_file(f).unwrap();
        }
    }
    out.finish().unwrap();
    let err = open_err(&out_path);
    assert!(err.contains("archive/data/0 is missing"), "{err}");
}

#[test]
fn non_zip_files_named_like_torch_checkpoints_are_refused_clearly() {
    let dir = Scratch::new("not-zip");
    let err = open_err(&dir.write("model.ckpt", b"<html>404 Not Found</html>"));
    assert!(err.contains("not a PyTorch checkpoint") && err.contains("3c 68 74 6d"), "{err}");
    let err = open_err(&dir.write("model.pth", &[0x80, 0x04, 0x95, 0x00, b'.']));
    assert!(err.contains("raw pickle"), "{err}");
    let err = open_err(&fixture("legacy.pt"));
    assert!(err.contains("legacy") && err.contains("safetensors"), "{err}");
    let err = open_err(&dir.write("empty.safetensors", b""));
    assert!(err.contains("empty"), "{err}");
    let err = open_err(&dir.write("model.nemo", b"plain text, not an archive"));
    assert!(err.contains("not a .nemo archive"), "{err}");
    let err = open_err(&dir.path("does-not-exist.ckpt"));
    assert!(err.contains("cannot open"), "{err}");
}

#[test]
fn checkpoints_whose_layout_is_not_a_state_dict_say_what_they_hold() {
    let err = open_err(&fixture("nested.pth"));
    assert!(err.contains("no tensor zeroconv can read") && err.contains("model (a dict is not a tensor)"), "{err}");
    let err = open_err(&fixture("sharded.nemo"));
    assert!(err.contains("2 weight shards") && err.contains("mp_rank_00/model_weights.ckpt"), "{err}");
}

#[test]
fn truncated_nemo_is_reported() {
    let dir = Scratch::new("trunc-nemo");
    for name in ["tiny.nemo", "tiny_gz.nemo"] {
        let good = fs::read(fixture(name)).unwrap();
        let p = dir.write(name, &good[..good.len() / 2]);
        let err = open_err(&p);
        assert!(err.contains("truncated") || err.contains("damaged"), "{name}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Writing.

fn sample_tensors() -> Vec<(String, HostTensor)> {
    let ramp = |n: usize| (0..n).map(|i| i as f64 / 8.0 - 1.0).collect::<Vec<_>>();
    vec![
        ("f32".into(), HostTensor::from_f64(vec![2, 3], DType::F32, &ramp(6)).unwrap()),
        ("f16".into(), HostTensor::from_f64(vec![5], DType::F16, &ramp(5)).unwrap()),
        ("bf16".into(), HostTensor::from_f64(vec![3, 1], DType::BF16, &ramp(3)).unwrap()),
        ("f64".into(), HostTensor::from_f64(vec![2], DType::F64, &[0.1, -1e300]).unwrap()),
        ("i64".into(), HostTensor::from_i64(vec![2], &[i64::MIN, 7]).unwrap()),
        ("i32".into(), HostTensor::from_f64(vec![1], DType::I32, &[-3.0]).unwrap()),
        ("scalar".into(), HostTensor::from_f64(Vec::<usize>::new(), DType::F32, &[2.5]).unwrap()),
        ("empty".into(), HostTensor::zeros(vec![0, 4], DType::F32)),
    ]
}

#[test]
fn write_then_read_round_trips_every_dtype() {
    let dir = Scratch::new("roundtrip");
    let path = dir.path("out.safetensors");
    let tensors = sample_tensors();
    let meta = BTreeMap::from([("step".to_string(), "42".to_string())]);
    write_safetensors(&path, &tensors, Some(&meta)).unwrap();
    let bytes = fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!((8 + header_len) % 8, 0, "the data section starts 8-byte aligned");

    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.metadata()["step"], "42");
    assert_eq!(ckpt.len(), tensors.len());
    for (name, t) in &tensors {
        let view = ckpt.get(name).unwrap();
        assert_eq!(view.to_host(), *t, "{name}");
        assert!(view.is_borrowed());
    }
    assert_eq!(dir.files(), BTreeSet::from(["out.safetensors".to_string()]), "no temporary file is left");
}

#[test]
fn converting_a_torch_checkpoint_to_safetensors_preserves_it() {
    let dir = Scratch::new("convert");
    let src = Checkpoint::open(&fixture("tiny.ckpt")).unwrap();
    let views: Vec<(&str, TensorView<'_>)> = src.keys().map(|k| (k, src.get(k).unwrap())).collect();
    let out = dir.path("tiny.safetensors");
    write_safetensors(&out, &views, None).unwrap();
    let back = Checkpoint::open(&out).unwrap();
    let mut want = expected()["tiny.ckpt"].clone();
    want["skipped"] = Value::Array(vec![]); // the bool tensor was not readable, so it was not written
    assert_matches_expected(&back, &want);
}

#[test]
fn invalid_tensors_are_refused_before_anything_is_written() {
    let dir = Scratch::new("invalid");
    let path = dir.path("out.safetensors");
    let bad = HostTensor { shape: vec![3].into(), dtype: DType::F32, bytes: vec![0; 8] };
    let err = write_safetensors(&path, &[("w", &bad)], None).unwrap_err().to_string();
    assert!(err.contains("tensor 'w'") && err.contains("needs 12 bytes"), "{err}");
    let t = HostTensor::zeros(vec![1], DType::F32);
    let err = write_safetensors(&path, &[("w", &t), ("w", &t)], None).unwrap_err().to_string();
    assert!(err.contains("given twice"), "{err}");
    assert!(dir.files().is_empty(), "{:?}", dir.files());
}

/// A writer that fails after `left` bytes, like a full disk or a dying NFS mount.
struct FailAfter<'a> {
    inner: &'a mut dyn Write,
    left: usize,
}

impl Write for FailAfter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other("injected failure: no space left on device"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        self.inner.write(&buf[..n])
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn interrupted_write_never_replaces_the_good_file_nor_leaves_litter() {
    let dir = Scratch::new("atomic");
    let path = dir.path("model.safetensors");
    let tensors = sample_tensors();
    write_safetensors(&path, &tensors, None).unwrap();
    let good = fs::read(&path).unwrap();

    let bigger: Vec<(String, HostTensor)> = vec![("w".into(), HostTensor::zeros(vec![1 << 16], DType::F32))];
    for fail_at in [0, 7, 100, 40_000] {
        let err = write_atomically(&path, |w| {
            write_safetensors_to(&mut FailAfter { inner: w, left: fail_at }, &bigger, None)
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("injected failure") && err.contains("unchanged"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), good, "failing at byte {fail_at} touched the target");
        assert_eq!(dir.files(), BTreeSet::from(["model.safetensors".to_string()]), "temporary file left behind");
    }

    // A panic mid-write behaves the same.
    let caught = std::panic::catch_unwind(|| {
        let _ = write_atomically(&path, |w| {
            w.write_all(b"partial").unwrap();
            panic!("writer crashed");
        });
    });
    assert!(caught.is_err());
    assert_eq!(fs::read(&path).unwrap(), good);
    assert_eq!(dir.files().len(), 1, "{:?}", dir.files());
    assert_matches_file(&path, &tensors);
}

fn assert_matches_file(path: &Path, tensors: &[(String, HostTensor)]) {
    let ckpt = Checkpoint::open(path).unwrap();
    for (name, t) in tensors {
        assert_eq!(ckpt.get(name).unwrap().to_host(), *t);
    }
}

#[test]
fn overwriting_a_mapped_checkpoint_leaves_its_reader_intact() {
    let dir = Scratch::new("remap");
    let path = dir.path("model.safetensors");
    let old = vec![("w".to_string(), HostTensor::from_f32(vec![3], &[1.0, 2.0, 3.0]).unwrap())];
    write_safetensors(&path, &old, None).unwrap();
    let reader = Checkpoint::open(&path).unwrap();
    let new = vec![("w".to_string(), HostTensor::from_f32(vec![3], &[7.0, 8.0, 9.0]).unwrap())];
    write_safetensors(&path, &new, None).unwrap();
    assert_eq!(reader.to_f32("w").unwrap(), [1.0, 2.0, 3.0], "the open checkpoint still sees the old bytes");
    assert_eq!(Checkpoint::open(&path).unwrap().to_f32("w").unwrap(), [7.0, 8.0, 9.0]);
}

// ---------------------------------------------------------------------------------------------------------------
// Key checking.

fn expected_from(ckpt: &Checkpoint, prefix: &str) -> Vec<(String, Vec<usize>)> {
    let view = ckpt.prefixed(prefix);
    view.keys().map(|k| (k.to_string(), view.shape(k).unwrap().to_vec())).collect()
}

#[test]
fn check_keys_accepts_a_matching_checkpoint() {
    let ckpt = Checkpoint::open(&fixture("tiny.ckpt")).unwrap();
    check_keys(&expected_from(&ckpt, "model.diffusion_model."), &ckpt, "model.diffusion_model.").unwrap();
    check_keys(&expected_from(&ckpt, ""), &ckpt, "").unwrap();
}

#[test]
fn check_keys_lists_missing_unexpected_and_misshaped_in_one_error() {
    let ckpt = Checkpoint::open(&fixture("tiny.ckpt")).unwrap();
    let mut expected = expected_from(&ckpt, "");
    expected.retain(|(k, _)| k != "half.weight"); // now unexpected
    for (k, shape) in expected.iter_mut() {
        if k == "linear.weight" {
            *k = "linear.weights".into(); // a rename: missing, with the real key as nearest
        }
        if k == "bf16.weight" {
            *shape = vec![2, 3]; // mis-shaped
        }
    }
    expected.push(("mask".into(), vec![3])); // present but unreadable
    expected.push(("time_embed.0.weight".into(), vec![4, 4])); // missing, nothing close
    let err = check_keys(&expected, &ckpt, "").unwrap_err().to_string();
    assert!(err.contains(&fixture("tiny.ckpt").display().to_string()), "{err}");
    assert!(err.contains("3 missing, 2 unexpected, 1 mis-shaped"), "{err}");
    assert!(err.contains("linear.weights (nearest present key: linear.weight)"), "{err}");
    assert!(err.contains("mask (present but unreadable: dtype bool"), "{err}");
    assert!(err.lines().any(|l| l.trim() == "time_embed.0.weight"), "{err}");
    assert!(err.contains("bf16.weight: expected [2, 3], checkpoint has [3, 2]"), "{err}");
    assert!(err.lines().any(|l| l.trim() == "half.weight"), "{err}");
}

#[test]
fn check_keys_truncates_long_lists_and_diagnoses_a_wrong_prefix() {
    let ckpt = Checkpoint::open(&fixture("tiny.ckpt")).unwrap();
    let expected: Vec<(String, Vec<usize>)> = (0..25).map(|i| (format!("block.{i}.weight"), vec![1])).collect();
    let err = check_keys(&expected, &ckpt, "control_model.").unwrap_err().to_string();
    assert!(err.contains("25 missing, 0 unexpected"), "{err}");
    assert!(err.contains("... and 15 more"), "{err}");
    assert!(err.contains("no key starts with 'control_model.'") && err.contains("model. (2)"), "{err}");
}

// ---------------------------------------------------------------------------------------------------------------
// Large files: mapped, never read whole.

/// Resident memory of this process in bytes (Linux), to show a multi-GB tensor is never paged in.
fn resident_bytes() -> Option<u64> {
    let mut s = String::new();
    fs::File::open("/proc/self/statm").ok()?.read_to_string(&mut s).ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[test]
fn a_4gb_checkpoint_is_mapped_not_read() {
    // A sparse file: 4 GiB of (unwritten) zeros for "big", then a small tensor at the end.
    let dir = Scratch::new("large");
    let big: usize = 4 << 30;
    let header = format!(
        r#"{{"big":{{"dtype":"F16","shape":[{}],"data_offsets":[0,{big}]}},"tail":{{"dtype":"F32","shape":[2],"data_offsets":[{big},{}]}}}}"#,
        big / 2,
        big + 8
    );
    let mut header = header.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let path = dir.path("big.safetensors");
    {
        let mut f = fs::File::create(&path).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(&header).unwrap();
        let data_start = 8 + header.len() as u64;
        f.set_len(data_start + big as u64).unwrap(); // sparse: no blocks are written
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(data_start + big as u64)).unwrap();
        f.write_all(&[0, 0, 0x80, 0x3f, 0, 0, 0x20, 0xc1]).unwrap(); // 1.0, -10.0
    }
    let before = resident_bytes();
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.to_f32("tail").unwrap(), [1.0, -10.0]);
    let view = ckpt.get("big").unwrap();
    assert!(view.is_borrowed(), "a 4 GiB tensor must be a slice of the mapping");
    assert_eq!(view.bytes.len(), big);
    assert_eq!(view.shape, [big / 2]);
    if let (Some(before), Some(after)) = (before, resident_bytes()) {
        let grew = after.saturating_sub(before);
        assert!(grew < 256 << 20, "opening a 4 GiB checkpoint grew resident memory by {grew} bytes");
    }
}
