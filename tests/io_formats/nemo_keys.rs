//! Config keys of README-config.md's "read" table doing what NeMo (and PyTorch Lightning under it) does with them,
//! each shown by a run of the shrunk built-in tiny configuration (or of its data pipeline): how many steps run, which
//! checkpoints are written, where a run resumes from, the pixels a sample becomes, or the error a key NeMo would
//! honour and zeroconv cannot is refused with. Every test has its own temporary folder.

use crate::common;
use common::training::{opts, tiny, tmp};

use std::io::Cursor;
use std::path::{Path, PathBuf};
use zeroconv::app::train::data::DataSource;
use zeroconv::app::train::{state, train, TrainOptions, TrainReport};
use zeroconv::io::checkpoint::Checkpoint;
use zeroconv::io::config::{load_config, load_config_with_report, Config, CropSize};
use zeroconv::io::data::tar::TarWriter;

/// The built-in tiny config, shrunk (64x64 pixels, batch 1, no base pretraining, every step logged).
fn small(overrides: &[&str]) -> Config {
    tiny(&["model.micro_batch_size=1", "model.base_pretrain_steps=0", "trainer.log_every_n_steps=1"], overrides)
}

fn steps(r: &TrainReport) -> Vec<u64> {
    r.losses.iter().filter(|l| l.0 == "control").map(|l| l.1).collect()
}

fn losses(r: &TrainReport) -> Vec<(u64, u64)> {
    r.losses.iter().filter(|l| l.0 == "control").map(|l| (l.1, l.2.to_bits())).collect()
}

/// The file names in `dir` (empty when it does not exist), sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The ControlNet checkpoint of step `step` in `run`.
fn checkpoint(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step_{:08}.safetensors", 10_000_000 + step))
}

/// The data position a checkpoint recorded.
fn data_state(path: &Path) -> serde_json::Value {
    serde_json::from_str(&state::read_state(path).unwrap().data).unwrap()
}

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// One shard of samples `s00000...`, each image (`.jpg` member, PNG bytes) and control map (`.png`) being `img(n)`,
/// captioned with words of the built-in vocabulary.
fn write_shard(path: &Path, count: usize, img: impl Fn(usize) -> image::RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut w = TarWriter::new(std::fs::File::create(path).unwrap());
    for n in 0..count {
        let bytes = png(&img(n));
        w.append(&format!("s{n:05}.jpg"), &bytes).unwrap();
        w.append(&format!("s{n:05}.png"), &bytes).unwrap();
        w.append(&format!("s{n:05}.txt"), b"a red circle").unwrap();
    }
    w.finish().unwrap();
}

/// A 64x64 flat picture whose grey level tells the sample apart.
fn flat(n: usize) -> image::RgbImage {
    image::RgbImage::from_pixel(64, 64, image::Rgb([(40 + 30 * n) as u8; 3]))
}

/// The small config reading `shards` (WebDataset) instead of the synthetic shapes.
fn on_shards(shards: &[&str], overrides: &[&str]) -> Config {
    let mut all = vec![
        "model.data.synthetic_data=False".to_string(),
        "model.data.num_workers=1".to_string(),
        "model.data.shuffle_buffer=0".to_string(),
        format!("model.data.train.dataset_path=[{}]", shards.join(",")),
    ];
    all.extend(overrides.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    small(&refs)
}

// --- trainer.max_steps / trainer.max_epochs ---------------------------------------------------------------------

#[test]
fn max_steps_minus_one_trains_max_epochs_of_the_synthetic_data() {
    // 7 samples an epoch, 2 per step: 3 steps an epoch, the 7th sample dropped (NeMo's DataLoader: drop_last).
    let dir = tmp("epochs-synthetic");
    let run = dir.path().join("run");
    let cfg = small(&[
        "model.micro_batch_size=2",
        "model.data.synthetic_data_length=7",
        "trainer.max_steps=-1",
        "trainer.max_epochs=2",
    ]);
    let r = train(&cfg, &opts(&run)).unwrap();
    assert_eq!(steps(&r), vec![1, 2, 3, 4, 5, 6]);
    // The second epoch started at sample 7, not 6: the last step ended the second epoch at sample 14.
    assert_eq!(data_state(&checkpoint(&run, 6))["synthetic_next"], 14);
}

#[test]
fn the_nearer_of_max_steps_and_max_epochs_ends_the_run() {
    let dir = tmp("epochs-both");
    let cfg = small(&["model.data.synthetic_data_length=4", "trainer.max_steps=100", "trainer.max_epochs=1"]);
    assert_eq!(steps(&train(&cfg, &opts(&dir.path().join("a"))).unwrap()), vec![1, 2, 3, 4]);
    let cfg = small(&["model.data.synthetic_data_length=4", "trainer.max_steps=2", "trainer.max_epochs=5"]);
    assert_eq!(steps(&train(&cfg, &opts(&dir.path().join("b"))).unwrap()), vec![1, 2]);
}

#[test]
fn max_epochs_stops_at_the_end_of_a_pass_over_the_shards() {
    // 5 samples in one shard, 2 per step: 2 steps an epoch (the 5th sample dropped), 2 epochs.
    let dir = tmp("epochs-shards");
    let shard = dir.path().join("data").join("shard-000000.tar");
    write_shard(&shard, 5, flat);
    let run = dir.path().join("run");
    let cfg = on_shards(
        &[&shard.display().to_string()],
        &["model.micro_batch_size=2", "trainer.max_steps=-1", "trainer.max_epochs=2"],
    );
    let r = train(&cfg, &opts(&run)).unwrap();
    assert_eq!(steps(&r), vec![1, 2, 3, 4]);
    // The run ended at the boundary: the checkpoint resumes at the start of the third pass.
    let st = data_state(&checkpoint(&run, 4));
    assert_eq!((st["epoch"].as_u64(), st["consumed"].as_u64()), (Some(2), Some(0)), "{st}");
}

#[test]
fn no_step_or_epoch_limit_is_refused_instead_of_training_forever() {
    let dir = tmp("no-limit");
    let run = dir.path().join("run");
    let err = train(&small(&["trainer.max_steps=-1", "trainer.max_epochs=-1"]), &opts(&run)).unwrap_err().to_string();
    assert!(err.contains("trainer.max_steps") && err.contains("trainer.max_epochs"), "{err}");
    assert!(!run.exists(), "nothing is written for a refused config");
}

// --- model.optim.name ------------------------------------------------------------------------------------------

#[test]
fn adam_decays_through_the_gradient_and_equals_adamw_without_decay() {
    let dir = tmp("adam");
    let run = |name: &str, wd: &str, out: &str| {
        let cfg = small(&[
            "trainer.max_steps=3",
            &format!("model.optim.name={name}"),
            &format!("model.optim.weight_decay={wd}"),
        ]);
        let out = dir.path().join(out);
        train(&cfg, &opts(&out)).unwrap();
        std::fs::read(out.join("controlnet.safetensors")).unwrap()
    };
    // Without weight decay Adam and AdamW are the same update.
    assert_eq!(run("adam", "0", "adam0"), run("adamw", "0", "adamw0"));
    // With it, Adam's L2 term (added to the gradient before the moments) is not AdamW's decoupled decay.
    assert_ne!(run("adam", "0.5", "adam5"), run("adamw", "0.5", "adamw5"));
}

#[test]
fn adam_matches_the_pytorch_update_rule_with_l2_weight_decay() {
    use zeroconv::engine::cpu::CpuBackend;
    use zeroconv::engine::{Backend, HostTensor, Program};
    use zeroconv::graph::optim::{adamw_hyper, append_training_step_l2, AdamWConfig};
    use zeroconv::graph::{DType, Graph};
    // loss = sum(p * c): the gradient is c; torch.optim.Adam adds weight_decay * p to it before the moments.
    let c = [0.5, -2.0, 0.0, 3.0];
    let p0 = [1.0, -1.0, 0.25, 2.0];
    let mut g = Graph::new();
    let p = g.param("p", [4], DType::F64, true);
    let cv = g.input("c", [4], DType::F64);
    let prod = g.mul(p, cv).unwrap();
    let loss = g.sum(prod, &[0], false).unwrap();
    g.outputs.push(loss);
    let wd = 0.3;
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 };
    let hyper = append_training_step_l2(&mut g, loss, &cfg, None, wd).unwrap();
    let mut prog = CpuBackend::new(2).compile(g).unwrap();
    prog.upload(p, &HostTensor::from_f64([4], DType::F64, &p0).unwrap()).unwrap();
    prog.upload(cv, &HostTensor::from_f64([4], DType::F64, &c).unwrap()).unwrap();
    let lr = 0.1;
    let (mut pr, mut m, mut v) = (p0.to_vec(), [0.0; 4], [0.0; 4]);
    for t in 1..=3u64 {
        prog.upload(hyper, &HostTensor::from_f64([3], DType::F32, &adamw_hyper(&cfg, lr, t)).unwrap()).unwrap();
        prog.launch().unwrap();
        for i in 0..4 {
            let grad = c[i] + wd * pr[i];
            m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * grad;
            v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * grad * grad;
            let (bc1, bc2) = (1.0 - cfg.beta1.powi(t as i32), 1.0 - cfg.beta2.powi(t as i32));
            pr[i] -= lr / bc1 * m[i] / ((v[i] / bc2).sqrt() + cfg.eps);
        }
        let got = prog.download(p).unwrap().to_f64();
        for (i, (a, b)) in got.iter().zip(&pr).enumerate() {
            // lr arrives through an f32 hyper buffer: agreement to f32 precision of lr.
            assert!((a - b).abs() <= 1e-7 * b.abs().max(1.0), "step {t} p[{i}]: {a} vs torch.optim.Adam {b}");
        }
    }
}

// --- trainer.gradient_clip_val ---------------------------------------------------------------------------------

#[test]
fn gradient_clip_val_zero_does_not_clip() {
    let dir = tmp("clip-zero");
    let run = |clip: &str| {
        let out = dir.path().join(format!("clip-{clip}"));
        train(&small(&["trainer.max_steps=2", &format!("trainer.gradient_clip_val={clip}")]), &opts(&out)).unwrap();
        std::fs::read(out.join("controlnet.safetensors")).unwrap()
    };
    // Lightning: 0 (like null) means no clipping, not clipping every gradient to nothing.
    assert_eq!(run("0"), run("null"));
}

// --- exp_manager.resume_if_exists / resume_ignore_no_checkpoint / resume_from_checkpoint ------------------------

#[test]
fn resume_if_exists_continues_the_folders_run() {
    let dir = tmp("resume-if-exists");
    let whole = train(&small(&["trainer.max_steps=4"]), &opts(&dir.path().join("whole"))).unwrap();
    let run = dir.path().join("run");
    train(&small(&["trainer.max_steps=2"]), &opts(&run)).unwrap();
    let second = train(&small(&["trainer.max_steps=4", "exp_manager.resume_if_exists=True"]), &opts(&run)).unwrap();
    assert_eq!(steps(&second), vec![3, 4]);
    assert_eq!(losses(&second), losses(&whole)[2..].to_vec(), "the resumed steps are the uninterrupted run's");
}

#[test]
fn resume_if_exists_without_a_checkpoint_fails_unless_told_to_ignore_it() {
    let dir = tmp("resume-none");
    let run = dir.path().join("run");
    let err = train(&small(&["trainer.max_steps=2", "exp_manager.resume_if_exists=True"]), &opts(&run))
        .unwrap_err()
        .to_string();
    assert!(err.contains("resume_if_exists") && err.contains("resume_ignore_no_checkpoint"), "{err}");
    let r = train(
        &small(&[
            "trainer.max_steps=2",
            "exp_manager.resume_if_exists=True",
            "exp_manager.resume_ignore_no_checkpoint=True",
        ]),
        &opts(&run),
    )
    .unwrap();
    assert_eq!(steps(&r), vec![1, 2], "no checkpoint to resume from: trained from scratch");
}

#[test]
fn resume_from_checkpoint_continues_from_that_checkpoint_in_a_new_folder() {
    let dir = tmp("resume-from");
    let whole = train(&small(&["trainer.max_steps=4"]), &opts(&dir.path().join("whole"))).unwrap();
    let first = dir.path().join("first");
    train(&small(&["trainer.max_steps=2"]), &opts(&first)).unwrap();
    let ck = checkpoint(&first, 2);
    for key in ["exp_manager.resume_from_checkpoint", "model.resume_from_checkpoint"] {
        let out = dir.path().join(key);
        let cfg = small(&["trainer.max_steps=4", &format!("{key}={}", ck.display())]);
        let r = train(&cfg, &opts(&out)).unwrap();
        assert_eq!(steps(&r), vec![3, 4], "{key}");
        assert_eq!(losses(&r), losses(&whole)[2..].to_vec(), "{key}");
        assert!(checkpoint(&out, 4).exists(), "{key}: the new folder holds the new run's checkpoints");
    }
    // A checkpoint trained with another computation is refused, as for --resume.
    let cfg = small(&[
        "trainer.max_steps=4",
        "model.seed=99",
        &format!("exp_manager.resume_from_checkpoint={}", ck.display()),
    ]);
    let err = train(&cfg, &opts(&dir.path().join("other-seed"))).unwrap_err().to_string();
    assert!(err.contains("model.seed"), "{err}");
}

// --- exp_manager.create_checkpoint_callback --------------------------------------------------------------------

#[test]
fn create_checkpoint_callback_false_writes_no_checkpoint() {
    let dir = tmp("no-checkpoints");
    let run = dir.path().join("run");
    let cfg = small(&[
        "trainer.max_steps=3",
        "exp_manager.create_checkpoint_callback=False",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=1",
    ]);
    assert_eq!(steps(&train(&cfg, &opts(&run)).unwrap()), vec![1, 2, 3]);
    assert_eq!(names(&run.join("checkpoints")), Vec::<String>::new());
    assert!(run.join("controlnet.safetensors").exists(), "the trained ControlNet is still exported");
}

// --- model.data.webdataset.local_root_path ---------------------------------------------------------------------

#[test]
fn relative_dataset_paths_start_at_local_root_path() {
    let dir = tmp("local-root");
    let root = dir.path().join("datasets");
    write_shard(&root.join("fill").join("shard-000000.tar"), 3, flat);
    let root_key = format!("model.data.webdataset.local_root_path={}", root.display());
    let cfg = on_shards(&["fill/shard-000000.tar"], &["trainer.max_steps=2", &root_key]);
    assert_eq!(steps(&train(&cfg, &opts(&dir.path().join("run"))).unwrap()), vec![1, 2]);
}

// --- model.channels_last ---------------------------------------------------------------------------------------

/// `model.channels_last=True` runs the step's convolutions and GroupNorms on NHWC activations (NeMo converts the
/// model and its inputs to torch.channels_last): the same training up to the order of some sums, and the exported
/// ControlNet has the same tensors, in their usual [O, C, kh, kw] layout.
#[test]
fn channels_last_trains_the_same_model_in_nhwc() {
    let dir = tmp("channels-last");
    let (cfg, report) = load_config_with_report(None, &["model.channels_last=True".to_string()]).unwrap();
    assert!(cfg.model.channels_last);
    assert!(!report.ignored_keys.iter().any(|k| k == "model.channels_last"), "{:?}", report.ignored_keys);
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let a = train(&small(&["trainer.max_steps=3", "model.channels_last=True"]), &opts(&a_dir)).unwrap();
    let b = train(&small(&["trainer.max_steps=3"]), &opts(&b_dir)).unwrap();
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 3);
    for ((step_a, bits_a), (step_b, bits_b)) in la.iter().zip(&lb) {
        let (x, y) = (f64::from_bits(*bits_a), f64::from_bits(*bits_b));
        assert_eq!(step_a, step_b);
        assert!((x - y).abs() <= 1e-5 * y.abs(), "step {step_a}: loss {x} channels last, {y} planar");
    }
    let (ca, cb) = (
        Checkpoint::open(&a_dir.join("controlnet.safetensors")).unwrap(),
        Checkpoint::open(&b_dir.join("controlnet.safetensors")).unwrap(),
    );
    let mut keys: Vec<&str> = cb.keys().collect();
    keys.sort_unstable();
    let mut keys_a: Vec<&str> = ca.keys().collect();
    keys_a.sort_unstable();
    assert_eq!(keys_a, keys);
    assert!(keys.iter().any(|k| cb.shape(k).is_some_and(|s| s.len() == 4 && s[2] == 3)), "3x3 filters exported");
    for k in keys {
        assert_eq!(ca.shape(k), cb.shape(k), "{k}");
        let (x, y) = (ca.to_f32(k).unwrap(), cb.to_f32(k).unwrap());
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        let worst = x.iter().zip(&y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(worst <= 1e-4 * scale, "{k}: differs by {worst} (largest value {scale})");
    }
}

// --- trainer.val_check_interval --------------------------------------------------------------------------------

#[test]
fn val_check_interval_as_a_fraction_of_an_epoch() {
    // 8 samples an epoch, 2 per step: 4 steps an epoch; 0.5 of it: a validation grid every 2 steps of each epoch.
    let dir = tmp("val-fraction");
    let run = dir.path().join("run");
    let cfg = small(&[
        "model.micro_batch_size=2",
        "model.data.synthetic_data_length=8",
        "trainer.max_steps=7",
        "trainer.val_check_interval=0.5",
    ]);
    train(&cfg, &TrainOptions { evaluate: true, ..opts(&run) }).unwrap();
    let grids: Vec<String> = names(&run).into_iter().filter(|n| n.starts_with("val_step_")).collect();
    assert_eq!(grids, ["val_step_000002.png", "val_step_000004.png", "val_step_000006.png"]);
}

#[test]
fn a_fraction_of_an_epoch_of_shards_is_refused_as_lightning_does() {
    let dir = tmp("val-fraction-shards");
    let shard = dir.path().join("shard-000000.tar");
    write_shard(&shard, 4, flat);
    let cfg = on_shards(&[&shard.display().to_string()], &["trainer.max_steps=2", "trainer.val_check_interval=0.5"]);
    let err = train(&cfg, &TrainOptions { evaluate: true, ..opts(&dir.path().join("run")) }).unwrap_err().to_string();
    assert!(err.contains("trainer.val_check_interval"), "{err}");
}

// --- trainer.devices / trainer.num_nodes -----------------------------------------------------------------------

#[test]
fn more_than_one_device_or_node_without_a_launcher_is_refused() {
    let dir = tmp("devices");
    for key in ["trainer.devices=2", "trainer.num_nodes=2"] {
        let run = dir.path().join(key);
        let err = train(&small(&["trainer.max_steps=2", key]), &opts(&run)).unwrap_err().to_string();
        let name = key.split('=').next().unwrap();
        assert!(err.contains(name) && err.contains("single process") && err.contains("zeroconv launch"), "{err}");
        assert!(!run.exists(), "nothing is written for a refused config");
    }
}

// --- model.data.train.augmentations ----------------------------------------------------------------------------

/// A 64x64 black picture with a white 32x32 square in the middle.
fn white_square(_: usize) -> image::RgbImage {
    image::RgbImage::from_fn(64, 64, |x, y| {
        let inside = (16..48).contains(&x) && (16..48).contains(&y);
        image::Rgb([if inside { 255 } else { 0 }; 3])
    })
}

/// The first sample the training data source yields (on one shard of `white_square`s) with these augmentations.
fn first_sample_with(dir: &Path, resize: Option<u32>, crop: (u32, u32), overrides: &[&str]) -> Vec<f32> {
    let shard = dir.join("square.tar");
    write_shard(&shard, 1, white_square);
    let mut cfg = on_shards(&[&shard.display().to_string()], overrides);
    cfg.model.data.train.augmentations.resize_smallest_side = resize;
    cfg.model.data.train.augmentations.center_crop_h_w = Some(CropSize { height: crop.0, width: crop.1 });
    let mut data = DataSource::from_config(&cfg, true, 0, 1).unwrap();
    data.next_batch(1).unwrap().images
}

fn first_sample(dir: &Path, resize: Option<u32>, crop: (u32, u32)) -> Vec<f32> {
    first_sample_with(dir, resize, crop, &[])
}

#[test]
fn resize_smallest_side_applies_before_the_crop() {
    // NeMo: resize the shorter side to 64 (already 64), then take the middle 32x32: the white square only.
    let dir = tmp("resize-then-crop");
    let img = first_sample(dir.path(), Some(64), (32, 32));
    assert_eq!(img.len(), 3 * 32 * 32);
    assert!(
        img.iter().all(|&v| v > 0.99),
        "the middle of the picture is white: min {:?}",
        img.iter().copied().reduce(f32::min)
    );
    // No resize: the crop is taken from the picture as it is.
    let img = first_sample(dir.path(), None, (32, 32));
    assert!(img.iter().all(|&v| v > 0.99));
    // Resize to 128 first: the middle 32x32 is inside the (doubled) white square too.
    let img = first_sample(dir.path(), Some(128), (32, 32));
    assert!(img.iter().all(|&v| v > 0.99));
}

#[test]
fn a_non_square_crop_stays_non_square() {
    let dir = tmp("non-square");
    // 32 rows, 48 columns: the square (columns 16..48 of 64) covers the middle 32 of the 48 columns.
    let img = first_sample(dir.path(), None, (32, 48));
    assert_eq!(img.len(), 3 * 32 * 48, "3 x 32 x 48 values");
    let row: Vec<f32> = img[..48].to_vec();
    assert!(row[..8].iter().all(|&v| v < -0.99) && row[8..40].iter().all(|&v| v > 0.99), "{row:?}");
    assert!(row[40..].iter().all(|&v| v < -0.99), "{row:?}");
}

#[test]
fn resize_smallest_side_is_bicubic_as_in_nemo() {
    // NeMo's Resize is torchvision's with InterpolationMode.BICUBIC: the default resize_interpolation.
    let dir = tmp("bicubic");
    let default = first_sample_with(dir.path(), Some(96), (64, 64), &[]);
    let bicubic = first_sample_with(
        dir.path(),
        Some(96),
        (64, 64),
        &["model.data.train.augmentations.resize_interpolation=bicubic"],
    );
    let bilinear = first_sample_with(
        dir.path(),
        Some(96),
        (64, 64),
        &["model.data.train.augmentations.resize_interpolation=bilinear"],
    );
    assert_eq!(default, bicubic);
    assert_ne!(default, bilinear);
}

#[test]
fn a_non_square_crop_trains_non_square_images() {
    let dir = tmp("non-square-train");
    let shard = dir.path().join("shard-000000.tar");
    write_shard(&shard, 3, white_square);
    let mut cfg = on_shards(&[&shard.display().to_string()], &["trainer.max_steps=2"]);
    cfg.model.data.train.augmentations.center_crop_h_w = Some(CropSize { height: 32, width: 48 });
    let r = train(&cfg, &opts(&dir.path().join("run"))).unwrap();
    assert_eq!(steps(&r), vec![1, 2]);
    assert!(r.losses.iter().all(|l| l.2.is_finite()));
    // The synthetic shapes are square: a non-square crop is refused for them.
    let mut cfg = small(&["trainer.max_steps=2"]);
    cfg.model.data.train.augmentations.center_crop_h_w = Some(CropSize { height: 32, width: 48 });
    let err = train(&cfg, &opts(&dir.path().join("synthetic"))).unwrap_err().to_string();
    assert!(err.contains("center_crop_h_w") && err.contains("square"), "{err}");
}

#[test]
fn nemos_infinite_sampler_is_refused() {
    // NeMo's infinite sampler resamples shards with replacement into epochs of chunk_size x shards samples; zeroconv's
    // epochs read every shard once, NeMo's `infinite_sampler: False`.
    let err = load_config(None, &["model.data.webdataset.infinite_sampler=True".to_string()]).unwrap_err().to_string();
    assert!(err.contains("model.data.webdataset.infinite_sampler") && err.contains("accepts only false"), "{err}");
    assert!(load_config(None, &["model.data.webdataset.infinite_sampler=False".to_string()]).is_ok());
}

/// A resume that switches between the synthetic shapes and shards is one clear error naming the data setting, not
/// a loader-state parse error.
#[test]
fn resuming_on_another_data_source_is_refused_naming_it() {
    let dir = tmp("switch-data");
    let shard = dir.path().join("s-000000.tar");
    write_shard(&shard, 4, flat);
    let shard_s = shard.to_str().unwrap().to_string();
    let run = dir.path().join("run");
    train(&small(&["trainer.max_steps=1"]), &opts(&run)).unwrap();
    let resumed = TrainOptions { resume: true, ..opts(&run) };
    let err = train(&on_shards(&[&shard_s], &["trainer.max_steps=2"]), &resumed).unwrap_err().to_string();
    assert!(err.contains("synthetic"), "{err}");
    assert!(!err.contains("missing field"), "{err}");
}
