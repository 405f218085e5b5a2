//! The training loop: the ControlNet (optionally after pretraining a base U-Net) trained as one
//! compiled graph per step, with atomic checkpoints that resume bit for bit, `metrics.jsonl`, a
//! progress line, validation grids, the exported ControlNet and, for the synthetic dataset, the
//! control-fidelity figure.

pub mod config_diff;
pub mod data;
pub mod lock;
pub mod lr_schedule;
pub mod parallel;
pub mod run_dir;
pub mod sources;
pub mod state;

use super::cli::peak_rss_bytes;
use super::device::{compile_program, CompileOptions, DeviceChoice, DeviceProgram};
use super::sampler::{sample, write_grid, SampleSettings};
use super::step;
use crate::app::weights::store::WeightStore;
use crate::engine::host_memory::human_bytes;
use crate::engine::{HostTensor, Program};
use crate::error::{Error, Result};
use crate::graph::optim::adamw_hyper;
use crate::graph::passes::ValueMap;
use crate::graph::{DType, ValueId};
use crate::io::checkpoint::{write_safetensors, Checkpoint};
use crate::io::config::model_config;
use crate::io::config::{Config, FirstStageKind, ValCheckInterval};
use crate::io::data::synthetic;
use crate::io::tokenizer::ClipTokenizer;
use crate::models::schedule::Schedule;
use crate::models::train_step::{latent_channels, micro_step_hw, FirstStage, StepInputs, StepModels, TrainPhase};
use crate::models::{ModelBuilder, ParamSpec};
use crate::rng::Rng;
use data::{DataSource, HostBatch};
use parallel::Parallel;
use state::TrainState;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub out_dir: PathBuf,
    /// Continue the folder's run from its newest checkpoint in `out_dir/checkpoints` (without it, a folder that
    /// holds a run's files is refused; see [`run_dir`]).
    pub resume: bool,
    pub threads: Option<usize>,
    /// Where the training step (and sampling) runs.
    pub device: DeviceChoice,
    /// Frozen weights no file provides are initialised at random instead of refused (tests, benchmarks).
    pub allow_random_weights: bool,
    /// Bad samples are errors instead of skipped.
    pub strict: bool,
    /// Draw a progress line on stderr.
    pub progress: bool,
    /// Sample validation grids and, for the synthetic data, the control-fidelity figure.
    pub evaluate: bool,
    /// Tests only: make the next checkpoint write fail after this many bytes.
    pub fail_checkpoint_after: Option<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct TrainReport {
    /// (phase, step, loss) of every optimizer step run in this call.
    pub losses: Vec<(String, u64, f64)>,
    /// Mean IoU of generated shapes with the hint's regions: (with the hint, with the hint blanked).
    pub fidelity: Option<(f64, f64)>,
    pub exported: Option<PathBuf>,
    /// This process's data-parallel rank (0 when alone); only rank 0 writes files.
    pub rank: usize,
}

/// The model configs of a run.
pub fn step_models(cfg: &Config) -> Result<StepModels> {
    let m = &cfg.model;
    let first_stage = match m.first_stage_config.kind {
        FirstStageKind::Pixel => FirstStage::Pixel,
        FirstStageKind::AutoencoderKl => FirstStage::Kl(model_config::vae(&m.first_stage_config, m.scale_factor)),
    };
    let mut clip = model_config::clip(&m.cond_stage_config)?;
    if m.cond_stage_config.version == synthetic::BUILTIN_VOCAB {
        clip.vocab_size = clip.vocab_size.max(synthetic::builtin_vocab_size()?);
    }
    let schedule = Schedule::scaled_linear(m.linear_start, m.linear_end, m.timesteps as usize);
    let models =
        StepModels { ldm: model_config::control_ldm(cfg), first_stage, clip, scale_factor: m.scale_factor, schedule };
    let c = latent_channels(&models);
    if models.ldm.unet.in_channels != c {
        return Err(Error::msg(format!(
            "model.unet_config.in_channels is {} but the first stage makes {c}-channel latents",
            models.ldm.unet.in_channels
        )));
    }
    if models.clip.hidden_size != models.ldm.unet.context_dim {
        return Err(Error::msg(format!(
            "model.cond_stage_config.hidden_size ({}) must equal model.unet_config.context_dim ({})",
            models.clip.hidden_size, models.ldm.unet.context_dim
        )));
    }
    Ok(models)
}

pub fn tokenizer(cfg: &Config) -> Result<ClipTokenizer> {
    let c = &cfg.model.cond_stage_config;
    if c.version == synthetic::BUILTIN_VOCAB {
        synthetic::builtin_tokenizer(c.max_length as usize).map(|t| t.with_text_cleanup(c.text_cleanup))
    } else {
        ClipTokenizer::from_config(c)
    }
}

/// A compiled training step for one phase.
struct StepProgram {
    prog: DeviceProgram,
    map: ValueMap,
    specs: Vec<ParamSpec>,
    inputs: StepInputs,
    loss: ValueId,
    hyper: ValueId,
    /// Gradient accumulation: the keep input and the first node of the update; the nodes before it run once per
    /// micro-batch, the rest once per step.
    accumulate: Option<(ValueId, usize)>,
    micro_batches: usize,
}

/// The compile options of a config's graphs: `threads`, and `use_flash_attention` (both keys agree).
pub fn compile_options(cfg: &Config, threads: Option<usize>) -> Result<CompileOptions> {
    let m = &cfg.model;
    let flash =
        super::device::flash_attention(m.unet_config.use_flash_attention, m.control_stage_config.use_flash_attention)?;
    Ok(CompileOptions { threads, flash_attention: flash })
}

fn build_step(
    cfg: &Config,
    models: &StepModels,
    phase: TrainPhase,
    hw: (usize, usize),
    opts: &TrainOptions,
) -> Result<StepProgram> {
    let st = step::train_step(cfg, models, phase, hw)?;
    let opt = step::run_passes(&st.graph, &step::pass_options(cfg, false))?;
    let kept = |v: ValueId| opt.map.get(v).ok_or_else(|| Error::msg("internal: a step input was optimised away"));
    let accumulate = match st.keep {
        Some(keep) => Some((kept(keep)?, crate::graph::optim::update_start(&opt.graph)?)),
        None => None,
    };
    let (loss, hyper) = (kept(st.loss)?, kept(st.hyper)?);
    let prog = compile_program(opts.device, opt.graph, &compile_options(cfg, opts.threads)?)?;
    Ok(StepProgram {
        prog,
        loss,
        hyper,
        map: opt.map,
        specs: st.params,
        inputs: st.inputs,
        accumulate,
        micro_batches: st.micro_batches,
    })
}

/// Everything a run carries across phases.
struct Run<'a> {
    cfg: &'a Config,
    opts: &'a TrainOptions,
    models: StepModels,
    tok: ClipTokenizer,
    store: WeightStore,
    data: DataSource,
    rng: Rng,
    /// The learning rate of each optimizer step (`model.optim.sched`, NeMo's formulas).
    lr_schedule: lr_schedule::LrSchedule,
    /// `metrics.jsonl` (rank 0 only).
    metrics: Option<std::fs::File>,
    report: TrainReport,
    /// The locked run folder (released when the run ends, however it ends); rank 0 only: the other ranks of a
    /// data-parallel run write nothing.
    folder: Option<run_dir::RunFolder>,
    /// This process's rank among the data-parallel ranks (alone: rank 0 of 1).
    par: Parallel,
}

impl Run<'_> {
    fn upload(&self, p: &mut StepProgram, v: ValueId, shape: Vec<usize>, dtype: DType, data: &[f64]) -> Result<()> {
        if let Some(nv) = p.map.get(v) {
            p.prog.upload(nv, &HostTensor::from_f64(shape, dtype, data)?)?;
        }
        Ok(())
    }

    /// Feeds the micro-batch of `batch` (this rank's samples of one optimizer step) that starts at sample `first`,
    /// with its random draws: each sample's timestep, noise and prompt dropout come from a generator of its own,
    /// keyed by `step_key` and its index in the step over every rank (this rank's `j`-th sample is the step's
    /// `j × world size + rank`-th, see [`DataSource::next_batch`]), so a sample draws the same numbers whichever
    /// rank and micro-batch it lands in (a data-parallel run trains on what one process would).
    fn feed(&mut self, p: &mut StepProgram, batch: &HostBatch, first: usize, step_key: u64) -> Result<()> {
        let n = self.cfg.model.micro_batch_size as usize;
        let (h, w) = self.data.image_size();
        let inp = p.inputs;
        let hint_c = self.models.ldm.control.hint_channels;
        let f = self.models.first_stage.factor();
        let c = latent_channels(&self.models);
        let samples = batch.captions.len();
        let (img_len, hint_len) = (3 * h * w, hint_c * h * w);
        if batch.hints.len() != samples * hint_len {
            return Err(Error::msg(format!(
                "hints have {} channels here, the ControlNet takes {hint_c}",
                batch.hints.len() / (samples * h * w).max(1)
            )));
        }
        let range = first..first + n;
        let img: Vec<f64> =
            batch.images[range.start * img_len..range.end * img_len].iter().map(|&v| v as f64).collect();
        self.upload(p, inp.image, vec![n, 3, h, w], DType::F32, &img)?;
        let hint: Vec<f64> =
            batch.hints[range.start * hint_len..range.end * hint_len].iter().map(|&v| v as f64).collect();
        self.upload(p, inp.hint, vec![n, hint_c, h, w], DType::F32, &hint)?;
        let l = self.models.clip.max_position_embeddings;
        let ids: Vec<f64> =
            batch.captions[range.clone()].iter().flat_map(|c| self.tok.encode(c)).map(|i| i as f64).collect();
        if ids.len() != n * l {
            return Err(Error::msg(format!(
                "model.cond_stage_config.max_length must equal max_position_embeddings ({l})"
            )));
        }
        self.upload(p, inp.ids, vec![n, l], DType::I64, &ids)?;
        let steps = self.models.schedule.len() as u64;
        let lat = c * (h / f) * (w / f);
        let drop = self.cfg.model.text_embedding_dropout_rate;
        let (mut ts, mut noise, mut posterior, mut keep) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for j in range {
            let in_step = (j * self.par.world_size + self.par.rank) as u64;
            let mut rng = Rng::new(crate::hash::fnv1a_extend(step_key, &in_step.to_le_bytes()));
            ts.push(rng.below(steps));
            noise.extend((0..lat).map(|_| rng.normal()));
            if inp.posterior_noise.is_some() {
                posterior.extend((0..lat).map(|_| rng.normal()));
            }
            keep.push(if rng.uniform() < drop { 0.0 } else { 1.0 });
        }
        let (sa, s1a): (Vec<f64>, Vec<f64>) = ts.iter().map(|&t| self.models.schedule.q_coeffs(t as usize)).unzip();
        let tsf: Vec<f64> = ts.iter().map(|&t| t as f64).collect();
        self.upload(p, inp.t, vec![n], DType::I64, &tsf)?;
        self.upload(p, inp.sqrt_alpha, vec![n, 1, 1, 1], DType::F32, &sa)?;
        self.upload(p, inp.sqrt_one_minus_alpha, vec![n, 1, 1, 1], DType::F32, &s1a)?;
        self.upload(p, inp.noise, vec![n, c, h / f, w / f], DType::F32, &noise)?;
        if let Some(pn) = inp.posterior_noise {
            self.upload(p, pn, vec![n, c, h / f, w / f], DType::F32, &posterior)?;
        }
        self.upload(p, inp.keep_text, vec![n, 1, 1], DType::F32, &keep)
    }

    /// One optimizer step (the `step`-th, 1-based, of phase `phase`): this rank's micro-batches of the step's
    /// samples fed and run, then the update with `hyper`, which first sums the gradients over the ranks (its
    /// all-reduce nodes). Returns the mean loss over every micro-batch of every rank.
    fn step(&mut self, p: &mut StepProgram, phase: &str, step: u64, hyper: &[f64; 3]) -> Result<f64> {
        let micro = self.cfg.model.micro_batch_size as usize;
        let per_rank = p.micro_batches * micro;
        let batch = self.data.next_batch(per_rank)?;
        let key = crate::hash::fnv1a64(format!("{}/{phase}/{step}", self.cfg.model.seed).as_bytes());
        let hyper = HostTensor::from_f64([3], DType::F32, hyper)?;
        let Some((keep, update)) = p.accumulate else {
            self.feed(p, &batch, 0, key)?;
            p.prog.upload(p.hyper, &hyper)?;
            p.prog.launch()?;
            return Ok(p.prog.download(p.loss)?.to_f64()[0]);
        };
        let mut sum = 0.0;
        for k in 0..p.micro_batches {
            self.feed(p, &batch, k * micro, key)?;
            p.prog.upload(keep, &HostTensor::from_f64([1], DType::F32, &[if k == 0 { 0.0 } else { 1.0 }])?)?;
            p.prog.launch_nodes(0..update)?;
            // A NaN is summed like any loss, so every rank reaches the reduction and stops together.
            sum += p.prog.download(p.loss)?.to_f64()[0];
        }
        if self.par.world_size > 1 {
            let mut all = [sum];
            self.par.sum(&mut all)?;
            sum = all[0];
        }
        p.prog.upload(p.hyper, &hyper)?;
        p.prog.launch_nodes(update..p.prog.graph().nodes.len())?;
        Ok(sum / (p.micro_batches * self.par.world_size) as f64)
    }

    fn lr(&self, step: u64) -> f64 {
        self.lr_schedule.at(step)
    }

    /// Writes a checkpoint (rank 0) with every rank's data position: every rank calls it together.
    fn checkpoint(&mut self, p: &mut StepProgram, phase: &str, step: u64) -> Result<Option<PathBuf>> {
        let positions = self.par.all_gather(self.data.state_json().as_bytes())?;
        let Some(folder) = self.folder.as_ref() else { return Ok(None) };
        let mut positions: Vec<String> =
            positions.into_iter().map(|b| String::from_utf8_lossy(&b).into_owned()).collect();
        // One process's checkpoints hold its position alone, as before data-parallel positions existed.
        let data = positions.remove(0);
        let dir = self.opts.out_dir.join("checkpoints");
        std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e.to_string()))?;
        let values = state::checkpoint_values(&p.prog, &p.map, &p.specs);
        let st = TrainState {
            step,
            phase: phase.to_string(),
            rng: self.rng.state(),
            data,
            data_ranks: positions,
            run: Some(folder.run_id().to_string()),
        };
        let path = state::path_for(&dir, step_id(phase, step));
        state::save(&path, &mut p.prog, &values, &st, Some(folder.config()), self.opts.fail_checkpoint_after)?;
        // Keep this run's newest `save_top_k` (-1: all); other files are never touched.
        folder.prune(self.cfg.exp_manager.checkpoint_callback_params.save_top_k);
        Ok(Some(path))
    }

    fn log(&mut self, phase: &str, step: u64, loss: f64, lr: f64, sps: f64, planned: usize) -> Result<()> {
        let line = format!(
            "{{\"phase\":\"{phase}\",\"step\":{step},\"loss\":{loss},\"lr\":{lr},\"samples_per_s\":{sps:.3},\"peak_memory_bytes\":{},\"planned_memory_bytes\":{planned}}}\n",
            peak_rss_bytes().unwrap_or(0)
        );
        match self.metrics.as_mut() {
            Some(m) => m.write_all(line.as_bytes()).map_err(|e| Error::msg(format!("metrics.jsonl: {e}"))),
            None => Ok(()),
        }
    }

    /// Runs `phase` from `start` (steps done) until `limits` end it.
    fn run_phase(
        &mut self,
        phase: TrainPhase,
        start: u64,
        limits: Limits,
        resume_from: Option<&Checkpoint>,
    ) -> Result<()> {
        let name = if phase == TrainPhase::Base { "base" } else { "control" };
        let hw = self.data.image_size();
        let t0 = Instant::now();
        let mut p = build_step(self.cfg, &self.models, phase, hw, self.opts)?;
        let graph = p.prog.graph();
        let fingerprint = || crate::hash::fnv1a64(crate::graph::passes::dump::dump(graph).as_bytes());
        self.par.check_same(&format!("{name} training step"), fingerprint)?;
        if let Some(comm) = self.par.communicator() {
            p.prog.set_communicator(comm)?;
        }
        if phase == TrainPhase::Control {
            self.store.copy_unet_into_control(&p.specs);
        }
        self.store.init_missing(&p.specs, self.cfg.model.seed)?;
        // The program keeps the only host copy of every weight while it trains (see `upload_and_release`).
        self.store.upload_and_release(&mut p.prog, &p.map, &p.specs)?;
        if let Some(ck) = resume_from {
            state::restore(&mut p.prog, &p.map, &p.specs, ck)?;
        }
        let planned = p.prog.plan().arena_bytes + p.prog.plan().source_bytes;
        let trainable: usize = p.specs.iter().filter(|s| s.trainable).map(|s| s.shape.numel()).sum();
        eprintln!(
            "{name}: {} trainable parameters, {} kernels, {} planned, compiled in {:.1} s",
            trainable,
            p.prog.graph().nodes.iter().filter(|n| !n.op.is_view()).count(),
            human_bytes(planned as u64),
            t0.elapsed().as_secs_f64()
        );
        // Samples per optimizer step, over every rank.
        let per_step = p.micro_batches * self.cfg.model.micro_batch_size as usize * self.par.world_size;
        let log_every = self.cfg.trainer.log_every_n_steps.max(1);
        let ckpt_every = self.cfg.exp_manager.checkpoint_callback_params.every_n_train_steps;
        let checkpoints = self.cfg.exp_manager.create_checkpoint_callback;
        let validate = self.opts.evaluate && phase == TrainPhase::Control;
        let val_every = if validate { self.cfg.trainer.val_check_interval } else { None };
        // The step count when it is known beforehand (for the progress line).
        let total = limits.planned_steps(self.data.epoch_samples(), per_step as u64);
        // Whether the end of an epoch must be known right after a step (max_epochs, validation at epoch ends).
        let look_ahead = limits.epochs.is_some() || matches!(val_every, Some(ValCheckInterval::EpochFraction(_)));
        let adam = step::adamw_config(self.cfg);
        let started = Instant::now();
        let mut window = (Instant::now(), 0usize);
        let mut s = start;
        loop {
            if limits.steps.is_some_and(|t| s >= t) {
                break;
            }
            let pos = self.data.align_step(per_step, &mut self.par)?;
            if limits.epochs.is_some_and(|e| pos.epoch >= e) {
                break;
            }
            let lr = self.lr(s);
            let loss = self.step(&mut p, name, s + 1, &adamw_hyper(&adam, lr, s + 1))?;
            if !loss.is_finite() {
                return Err(Error::msg(format!(
                    "{name} step {}: the loss is {loss}; rerun with ZEROCONV_CHECK_FINITE=1 to stop at the first kernel that produces a NaN/Inf (and --resume from the last checkpoint), or lower model.optim.lr",
                    s + 1
                )));
            }
            self.report.losses.push((name.to_string(), s + 1, loss));
            window.1 += per_step;
            let done = s + 1;
            s = done;
            // The last step: max_steps reached, or the next step would start in epoch max_epochs.
            let steps_done = limits.steps.is_some_and(|t| done >= t);
            let next =
                if look_ahead && !steps_done { Some(self.data.align_step(per_step, &mut self.par)?) } else { None };
            let last = steps_done || limits.epochs.is_some_and(|e| next.is_some_and(|n| n.epoch >= e));
            if done.is_multiple_of(log_every) || last || done == start + 1 {
                let sps = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
                self.log(name, done, loss, lr, sps, planned)?;
                window = (Instant::now(), 0);
            }
            if self.opts.progress && self.par.is_root() {
                let el = started.elapsed().as_secs_f64();
                let rate = (done - start) as f64 / el.max(1e-9);
                let of = match total {
                    Some(t) => {
                        let eta = t.saturating_sub(done) as f64 / rate.max(1e-9);
                        format!("{done}/{t} ETA {:02}:{:02}", (eta / 60.0) as u64, (eta % 60.0) as u64)
                    }
                    None => format!("{done} (epoch {})", pos.epoch + 1),
                };
                eprint!("\r{name} step {of} loss {loss:.4} {:.1} samples/s   ", rate * per_step as f64);
                if last {
                    eprintln!();
                }
            }
            if checkpoints && (ckpt_every.is_some_and(|e| e > 0 && done.is_multiple_of(e)) || last) {
                self.checkpoint(&mut p, name, done)?;
            }
            let val_due = match val_every {
                Some(ValCheckInterval::Steps(v)) => v > 0 && done.is_multiple_of(v),
                // Lightning: every int(fraction x steps of the epoch) steps into the epoch; for shards, whose epoch
                // length is unknown, only 1.0 (checked before training): at the end of each epoch.
                Some(ValCheckInterval::EpochFraction(f)) => match pos.index {
                    Some((i, per_epoch)) => (i + 1).is_multiple_of(((per_epoch as f64 * f) as u64).max(1)),
                    None => next.is_some_and(|n| n.epoch > pos.epoch),
                },
                None => false,
            };
            if val_due && !last && self.par.is_root() {
                self.store.download_all(&mut p.prog, &p.map, &p.specs)?;
                self.validation_grid(done)?;
                self.store.release(&p.map, &p.specs);
            }
            if last {
                break;
            }
        }
        // What the host needs next: the base model's file and the ControlNet phase need every weight after the
        // base phase, the fidelity evaluation samples with every weight; otherwise the trained weights (the export).
        let evaluates = self.opts.evaluate && matches!(self.data, DataSource::Synthetic { .. });
        if phase == TrainPhase::Base || evaluates {
            self.store.download_all(&mut p.prog, &p.map, &p.specs)?;
        } else {
            self.store.download_trainable(&mut p.prog, &p.map, &p.specs)?;
        }
        Ok(())
    }

    fn validation_set(&self, n: usize) -> Result<(Vec<f32>, Vec<String>)> {
        self.data.validation_samples(n, self.cfg.data_seed())
    }

    fn sample_settings(&self) -> SampleSettings {
        SampleSettings {
            steps: 50,
            cfg_scale: 1.0,
            seed: 7,
            threads: self.opts.threads,
            device: self.opts.device,
            flash_attention: self.cfg.model.unet_config.use_flash_attention,
            ..Default::default()
        }
    }

    /// Control map beside generated samples (DDIM, 50 steps), as `val_step_NNNN.png`.
    fn validation_grid(&self, step: u64) -> Result<PathBuf> {
        let size = self.data.size();
        let (hints, caps) = self.validation_set(4)?;
        let imgs = sample(&self.models, &self.store, &self.tok, &hints, &caps, size, &self.sample_settings())?;
        let path = self.opts.out_dir.join(format!("val_step_{step:06}.png"));
        write_grid(&path, &[(&hints, true), (&imgs, false)], caps.len(), size)?;
        Ok(path)
    }

    /// Mean IoU of generated shapes with the hint regions, with the hint and with it blanked.
    fn fidelity(&self) -> Result<(f64, f64, PathBuf)> {
        let size = self.data.size();
        let n = 8;
        let (hints, caps) = self.validation_set(n)?;
        let s = self.sample_settings();
        let with = sample(&self.models, &self.store, &self.tok, &hints, &caps, size, &s)?;
        let blank = vec![0.0f32; hints.len()];
        let without = sample(&self.models, &self.store, &self.tok, &blank, &caps, size, &s)?;
        let plane = 3 * size * size;
        // Compared on the latent grid: the model generates one colour per latent cell.
        let f = self.models.first_stage.factor();
        let cells = size / f;
        let score = |imgs: &[f32]| -> f64 {
            (0..n)
                .map(|i| {
                    let h = synthetic::block_average(&hints[i * plane..(i + 1) * plane], size, f);
                    let g = synthetic::block_average(&imgs[i * plane..(i + 1) * plane], size, f);
                    synthetic::iou(&synthetic::image_mask(&g, cells), &synthetic::hint_mask(&h, cells))
                })
                .sum::<f64>()
                / n as f64
        };
        let path = self.opts.out_dir.join("samples.png");
        write_grid(&path, &[(&hints, true), (&with, false), (&without, false)], n, size)?;
        Ok((score(&with), score(&without), path))
    }
}

/// Checkpoint file ids: base steps and control steps do not collide.
fn step_id(phase: &str, step: u64) -> u64 {
    if phase == "base" {
        step
    } else {
        10_000_000 + step
    }
}

/// When a phase ends: after `steps` optimizer steps or at the end of epoch `epochs` of the data (Lightning's
/// max_steps and max_epochs: whichever comes first).
#[derive(Clone, Copy, Debug)]
struct Limits {
    steps: Option<u64>,
    epochs: Option<u64>,
}

impl Limits {
    /// The steps the phase runs when known beforehand: `epochs` passes over data of `epoch_samples` samples hold
    /// `epoch_samples / per_step` steps each (an epoch's leftover is dropped).
    fn planned_steps(&self, epoch_samples: Option<u64>, per_step: u64) -> Option<u64> {
        let by_epochs = self.epochs.zip(epoch_samples).map(|(e, n)| e * (n / per_step.max(1)));
        match (self.steps, by_epochs) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Settings NeMo honours and this run cannot, refused before anything is written.
/// The training images must divide into the first stage's latents and those into the U-Net's levels: one clear
/// error naming the setting, instead of a shape error deep inside the model.
fn check_image_size(models: &StepModels, (h, w): (usize, usize)) -> Result<()> {
    let factor = models.image_multiple();
    if h % factor != 0 || w % factor != 0 || h == 0 || w == 0 {
        return Err(Error::msg(format!(
            "the training images are {h}x{w} pixels, but both sides must be multiples of {factor} (the first stage \
             downsamples by {}, the U-Net's {} levels by the rest): set model.data.train.augmentations.center_crop_h_w \
             (and resize_smallest_side) to multiples of {factor}",
            models.first_stage.factor(),
            models.ldm.unet.channel_mult.len()
        )));
    }
    Ok(())
}

fn check_run(cfg: &Config, data: &DataSource, evaluate: bool) -> Result<()> {
    let t = &cfg.trainer;
    if t.max_steps.is_none() && t.max_epochs.is_none() {
        return Err(Error::msg(
            "trainer.max_steps and trainer.max_epochs are both -1 (no limit): NeMo would train until it is stopped; set \
             trainer.max_steps (optimizer steps) or trainer.max_epochs (passes over the data)",
        ));
    }
    if t.max_epochs.is_some() && cfg.model.base_pretrain_steps > 0 {
        return Err(Error::msg(
            "trainer.max_epochs with model.base_pretrain_steps > 0: the base pretraining reads the data stream first, so \
             the ControlNet's epochs would not be passes over the data; set trainer.max_steps instead",
        ));
    }
    if let Some(ValCheckInterval::EpochFraction(f)) = t.val_check_interval {
        if f != 1.0 && data.epoch_samples().is_none() {
            return Err(Error::msg(format!(
                "trainer.val_check_interval is {f}, a fraction of an epoch, but the length of an epoch of WebDataset \
                 shards is not known before reading it (NeMo guesses it as webdataset.chunk_size x shards; Lightning \
                 refuses fractions for iterable datasets of unknown length): give a number of steps, or 1.0 (at the \
                 end of every epoch)"
            )));
        }
    }
    let (h, w) = data.image_size();
    if h != w && t.val_check_interval.is_some() && evaluate {
        return Err(Error::msg(format!(
            "trainer.val_check_interval: validation grids are sampled at square sizes only, and \
             model.data.train.augmentations.center_crop_h_w is {h}, {w}; set trainer.val_check_interval=null (or \
             train with --no-eval)"
        )));
    }
    Ok(())
}

pub fn train(cfg: &Config, opts: &TrainOptions) -> Result<TrainReport> {
    opts.device.check_available()?;
    // trainer.devices × trainer.num_nodes processes, started by a launcher (refused without one).
    let mut par = Parallel::join(cfg, &crate::engine::dist::env::DistEnv::from_process_env()?, opts.device)?;
    // This rank's share of the data (data.rs).
    let mut data = DataSource::from_config(cfg, opts.strict, par.rank, par.world_size)?;
    check_run(cfg, &data, opts.evaluate)?;
    let limits = Limits { steps: cfg.trainer.max_steps, epochs: cfg.trainer.max_epochs };
    // NeMo computes the schedule's max_steps from max_epochs when only that is set and the data's length is known.
    let per_step = u64::from(cfg.global_batch_size());
    let sched_steps = limits.planned_steps(data.epoch_samples(), per_step);
    let lr_schedule = lr_schedule::LrSchedule::new(cfg.model.optim.lr, cfg.model.optim.sched.as_ref(), sched_steps)?;
    let models = step_models(cfg)?;
    check_image_size(&models, data.image_size())?;
    let tok = tokenizer(cfg)?;
    // Pretrained weights (all specs of both phases are known after building; load by key). Every parameter is
    // accounted for before anything is compiled, and before the run folder is opened: a frozen one without a
    // source is an error that leaves no run behind to block the corrected command.
    let all_specs = {
        let mut b = ModelBuilder::new(DType::F32);
        micro_step_hw(&mut b, &models, TrainPhase::Control, 1, data.image_size(), DType::F32, "")?;
        b.params
    };
    let mut store = WeightStore::default();
    let mut weight_sources = sources::load_pretrained(cfg, &mut store, &all_specs)?;
    sources::account(cfg, &all_specs, &store, &mut weight_sources, opts.allow_random_weights)?;
    if par.is_root() {
        eprint!("{}", weight_sources.render());
    }
    let out = &opts.out_dir;
    // The run folder, locked for this run; a fresh run refuses another run's folder, a resume takes the newest
    // checkpoint of the folder's run, checks the config against it and cuts metrics.jsonl back to it (run_dir.rs).
    // `--resume` and exp_manager.resume_if_exists resume the folder's run; resume_from_checkpoint starts a new run
    // from another run's checkpoint.
    let start = if opts.resume {
        run_dir::Start::Resume
    } else if cfg.exp_manager.resume_if_exists {
        run_dir::Start::ResumeIfExists { ignore_no_checkpoint: cfg.exp_manager.resume_ignore_no_checkpoint }
    } else {
        run_dir::Start::Fresh
    };
    // Rank 0 opens (and locks) the run folder and tells the other ranks which checkpoint the run continues from.
    let (folder, mut latest, metrics, mut started_from) = if par.is_root() {
        let o = run_dir::open_with(out, cfg, start, cfg.resume_checkpoint())?;
        (Some(o.folder), o.latest, Some(o.metrics), o.started_from)
    } else {
        (None, None, None, None)
    };
    let path_bytes = |p: Option<&Path>| p.map(|p| p.to_string_lossy().into_owned().into_bytes()).unwrap_or_default();
    let latest_path = par.from_root(&path_bytes(latest.as_ref().map(|(ck, _)| ck.path())))?;
    let from_path = par.from_root(&path_bytes(started_from.as_deref()))?;
    if !par.is_root() {
        let path = |b: Vec<u8>| (!b.is_empty()).then(|| PathBuf::from(String::from_utf8_lossy(&b).into_owned()));
        if let Some(p) = path(latest_path) {
            latest = Some(state::load(&p)?);
        }
        started_from = path(from_path);
    }
    let mut rng = Rng::new(cfg.model.seed);
    if let Some((_, st)) = &latest {
        rng = Rng::from_state(st.rng);
        data.restore(&st.data_positions())?;
        if par.is_root() {
            eprintln!("resuming the {} phase after step {}", st.phase, st.step);
        }
    }
    let mut run = Run {
        cfg,
        opts,
        models,
        tok,
        store: WeightStore::default(),
        data,
        rng,
        lr_schedule,
        metrics,
        report: TrainReport::default(),
        folder,
        par,
    };
    run.store = store;
    let base_steps = cfg.model.base_pretrain_steps;
    // The base model this run trains itself (U-Net, and the frozen text encoder and first stage it was
    // trained with), so a resumed run and `zeroconv sample --ckpt` find the same weights.
    let base_file = out.join("base_model.safetensors");
    let resumed_phase = latest.as_ref().map(|(_, st)| st.phase.clone());
    // Phase 1: the base U-Net, when asked for and not already done.
    if base_steps > 0 && resumed_phase.as_deref() != Some("control") {
        let (start, ck) = match &latest {
            Some((ck, st)) if st.phase == "base" => (st.step, Some(ck)),
            _ => (0, None),
        };
        run.run_phase(TrainPhase::Base, start, Limits { steps: Some(base_steps), epochs: None }, ck)?;
        // Written by rank 0 before any rank goes on (a resume of the ControlNet phase reads it).
        if run.par.is_root() {
            let mut base = run.store.under("model.diffusion_model.");
            base.extend(run.store.under("cond_stage_model."));
            base.extend(run.store.under("first_stage_model."));
            write_safetensors(&base_file, &base, None)?;
        }
        run.par.barrier()?;
    } else if base_steps > 0 {
        // Started from another run's checkpoint: the base model it trained against is in that run's folder.
        let from_run =
            started_from.as_deref().and_then(|p| p.parent()?.parent()).map(|d| d.join("base_model.safetensors"));
        let source = from_run.as_deref().unwrap_or(&base_file);
        let ck = Checkpoint::open(source)?;
        let n = run.store.load_matching(&ck, &all_specs)?;
        if n == 0 {
            return Err(Error::file(source, "holds no U-Net weights"));
        }
        if from_run.is_some() && run.par.is_root() {
            let mut base = run.store.under("model.diffusion_model.");
            base.extend(run.store.under("cond_stage_model."));
            base.extend(run.store.under("first_stage_model."));
            write_safetensors(&base_file, &base, None)?;
        }
    }
    // Phase 2: the ControlNet.
    let (start, ck) = match &latest {
        Some((ck, st)) if st.phase == "control" => (st.step, Some(ck)),
        _ => (0, None),
    };
    run.run_phase(TrainPhase::Control, start, limits, ck)?;
    if let Some(usage) = run.data.usage() {
        let who = if run.par.world_size > 1 {
            format!(" (rank {} of {})", run.par.rank, run.par.world_size)
        } else {
            String::new()
        };
        eprintln!("data{who}: {usage}");
    }
    if !run.par.is_root() {
        // The other ranks write nothing; rank 0 exports and evaluates.
        run.report.rank = run.par.rank;
        return Ok(run.report);
    }
    // Export the ControlNet in the original layout (plus the U-Net decoder when it trained).
    let mut export = run.store.under("control_model.");
    if !cfg.model.sd_locked {
        export.extend(
            run.store
                .under("model.diffusion_model.")
                .into_iter()
                .filter(|(k, _)| k.contains(".output_blocks.") || k.contains(".out.")),
        );
    }
    let export_path = out.join("controlnet.safetensors");
    write_safetensors(&export_path, &export, None)?;
    run.report.exported = Some(export_path);
    if opts.evaluate && matches!(run.data, DataSource::Synthetic { .. }) {
        let (with, without, grid) = run.fidelity()?;
        eprintln!(
            "control fidelity (mean IoU of generated shapes with the hint's regions, 8 held-out hints): with the hint {with:.3}, \
             hint blanked {without:.3}; grid: {}",
            grid.display()
        );
        let json = format!("{{\"iou_with_hint\":{with},\"iou_hint_blanked\":{without},\"samples\":8}}\n");
        std::fs::write(out.join("fidelity.json"), json)
            .map_err(|e| Error::file(out.join("fidelity.json"), e.to_string()))?;
        run.report.fidelity = Some((with, without));
    }
    Ok(run.report)
}

/// Where a run writes: `--out`, else the config's exp_manager folder.
pub fn out_dir(cfg: &Config, out: Option<&Path>) -> PathBuf {
    out.map(Path::to_path_buf).unwrap_or_else(|| cfg.run_dir())
}
