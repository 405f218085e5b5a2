//! `zeroconv sample` end to end on weights a tiny training run wrote: the config's `infer.*` are the defaults
//! (control maps and prompts, images per prompt, steps), the grid has one row per (map, prompt) pair, and DDIM's η
//! adds seeded noise (η > 0 changes the image; the same seed repeats it).

use crate::common;
use common::cli::run_ok as zeroconv;
use common::training::tmp;

#[test]
fn infer_keys_drive_sampling_and_eta_adds_seeded_noise() {
    let d = tmp("sample-cli");
    let dir = d.path();
    zeroconv(
        dir,
        &[
            "train",
            "--no-eval",
            "--allow-random-weights",
            "--threads",
            "2",
            "--out",
            "run",
            "model.base_pretrain_steps=1",
            "trainer.max_steps=1",
            "model.data.train.augmentations.resize_smallest_side=64",
            "model.data.train.augmentations.center_crop_h_w=64",
        ],
    );
    for (name, v) in [("a.png", 0u8), ("b.png", 255u8)] {
        image::RgbImage::from_pixel(64, 64, image::Rgb([v, 128, 255 - v])).save(dir.join(name)).unwrap();
    }
    let sample = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "sample",
            "--ckpt",
            "run/base_model.safetensors",
            "--control",
            "run/controlnet.safetensors",
            "--threads",
            "2",
            "--out",
            out,
            "infer.control=[a.png,b.png]",
            "infer.prompts=[a red square,a blue circle]",
            "infer.num_images_per_prompt=2",
            "infer.inference_steps=3",
        ];
        args.extend(extra);
        let stderr = zeroconv(dir, &args);
        assert!(stderr.contains("DDIM step 3/3"), "no progress over the 3 DDIM steps: {stderr}");
        std::fs::read(dir.join(out)).unwrap()
    };
    let deterministic = sample("eta0.png", &[]);
    let grid = image::load_from_memory(&deterministic).unwrap();
    // Two rows (one per map and prompt), each the map then 2 samples.
    assert_eq!((grid.width(), grid.height()), (3 * 64, 2 * 64));
    let noisy = sample("eta1.png", &["--eta", "1"]);
    assert_ne!(deterministic, noisy, "eta 1 must add noise");
    assert_eq!(noisy, sample("eta1-again.png", &["--eta", "1"]), "the same seed repeats the same noise");
    assert_ne!(noisy, sample("eta1-seed.png", &["--eta", "1", "--seed", "5"]), "another seed, other noise");
}
