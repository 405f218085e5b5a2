//! zeroconv's DDIM against diffusers' DDIMScheduler as Stable Diffusion configures it (fixture written by diffusers:
//! scripts/make_ddim_fixture.py): the same timesteps for every step count, and the same x_prev for the same x_t, ε
//! and noise, with η = 0 and η > 0; a whole trajectory replayed from x_T stays on diffusers' within f32 rounding.

use crate::common;

use zeroconv::models::schedule::Schedule;

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn ddim_matches_diffusers() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ddim/trajectories.json");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let s = &doc["scheduler"];
    let sched = Schedule::scaled_linear(
        s["beta_start"].as_f64().unwrap(),
        s["beta_end"].as_f64().unwrap(),
        s["num_train_timesteps"].as_u64().unwrap() as usize,
    );
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 5 && cases.iter().any(|c| c["eta"].as_f64().unwrap() > 0.0));
    for c in cases {
        let (steps, eta) = (c["steps"].as_u64().unwrap() as usize, c["eta"].as_f64().unwrap());
        let what = format!("{steps} steps, eta {eta}");
        let want_ts: Vec<usize> =
            c["timesteps"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as usize).collect();
        let ts = sched.ddim_timesteps(steps);
        assert_eq!(ts, want_ts, "{what}: timesteps");
        let xs = c["x"].as_array().unwrap();
        let mut ours = f32s(&xs[0]);
        for (k, &t) in ts.iter().enumerate() {
            let eps = f32s(&c["eps"][k]);
            let noise = f32s(&c["noise"][k]);
            let noise = (eta > 0.0).then_some(&noise[..]);
            let want = f64s(&xs[k + 1]);
            // One step from diffusers' own x_t: only this step's rounding.
            let step = sched.ddim_step(&f32s(&xs[k]), &eps, t, ts.get(k + 1).copied(), eta, noise);
            let got: Vec<f64> = step.iter().map(|&v| v as f64).collect();
            common::assert_close(&format!("{what}: step {k} (t = {t})"), &got, &want, 1e-5);
            // The whole trajectory from x_T.
            ours = sched.ddim_step(&ours, &eps, t, ts.get(k + 1).copied(), eta, noise);
        }
        let got: Vec<f64> = ours.iter().map(|&v| v as f64).collect();
        common::assert_close(&format!("{what}: x_0 after the whole trajectory"), &got, &f64s(&xs[steps]), 1e-4);
    }
}
