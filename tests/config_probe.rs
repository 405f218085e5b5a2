use std::path::Path;
use zeroconv::frontend::config::*;
#[test]
fn probe() {
    for p in ["configs/controlnet_sd15.yaml", "configs/tiny.yaml", "../shared/bench/bench_small.yaml"] {
        match load_config_with_report(Some(Path::new(p)), &[]) {
            Ok((c, r)) => { println!("{p}: OK ignored={}", r.ignored_keys.len()); if p.contains("tiny") { println!("{}", c.to_yaml()); } }
            Err(e) => println!("{p}: ERR {e}"),
        }
    }
    let cases: &[&[&str]] = &[
        &["model.unet_config.model_chanels=3"],
        &["model.unet_config.model_channels=abc"],
        &["trainer.precision=bf17"],
        &["model.optim.name=adamx"],
        &["model.parameterization=v"],
        &["model.sd_locked"],
        &["model.a..b=1"],
        &["+trainer.precision=16"],
        &["model.data.train.dataset_path=a.tar,b.tar"],
        &["model.data.train.dataset_path=[a.tar,b.tar"],
        &["~model.nothing"],
        &["model.control_stage_config.params.model_channels=64"],
        &["model.control_stage_config.model_channels=64"],
        &["trainer.max_steps=1.5"],
        &["model.unet_config=3"],
        &["model.foo.bar=3"],
        &["model.parametrization=eps"],
        &["exp_manager.ema.enable=True"],
    ];
    for ov in cases {
        let ov: Vec<String> = ov.iter().map(|s| s.to_string()).collect();
        match load_config(Some(Path::new("configs/controlnet_sd15.yaml")), &ov) {
            Ok(_) => println!("{ov:?}: OK"),
            Err(e) => println!("{ov:?}: ERR {e}"),
        }
    }
}
