//! The DDPM noise schedule of LDM (`scaled_linear`: linear in √β), and what training and DDIM
//! sampling derive from it.

#[derive(Clone, Debug)]
pub struct Schedule {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
}

impl Schedule {
    /// β_t = (√start + t/(T-1)·(√end − √start))², as `make_beta_schedule("linear")` in LDM.
    pub fn scaled_linear(linear_start: f64, linear_end: f64, timesteps: usize) -> Self {
        let (a, b) = (linear_start.sqrt(), linear_end.sqrt());
        let n = timesteps.max(2);
        let betas: Vec<f64> = (0..timesteps).map(|t| (a + (b - a) * t as f64 / (n - 1) as f64).powi(2)).collect();
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|bt| {
                acc *= 1.0 - bt;
                acc
            })
            .collect();
        Schedule { betas, alphas_cumprod }
    }

    /// Stable Diffusion's schedule: 0.00085 → 0.012 over 1000 steps.
    pub fn sd() -> Self {
        Self::scaled_linear(0.00085, 0.012, 1000)
    }

    pub fn len(&self) -> usize {
        self.betas.len()
    }
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// (√ᾱ_t, √(1−ᾱ_t)): x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε.
    pub fn q_coeffs(&self, t: usize) -> (f64, f64) {
        let a = self.alphas_cumprod[t];
        (a.sqrt(), (1.0 - a).sqrt())
    }

    /// DDIM timesteps: "uniform" spacing as LDM's `make_ddim_timesteps` (c = T/steps, t = i·c + 1),
    /// in descending order.
    pub fn ddim_timesteps(&self, steps: usize) -> Vec<usize> {
        let c = (self.len() / steps.max(1)).max(1);
        let mut ts: Vec<usize> = (0..self.len()).step_by(c).map(|t| (t + 1).min(self.len() - 1)).collect();
        ts.truncate(steps.max(1));
        ts.reverse();
        ts
    }

    /// One DDIM update from x_t with prediction ε to x_prev (Song et al., eq. 12; the final step goes to ᾱ_0, as
    /// LDM and diffusers' `set_alpha_to_one=False` do): x_prev = √ᾱ_prev·x̂_0 + √(1 − ᾱ_prev − σ²)·ε + σ·z with
    /// σ = η·√((1 − ᾱ_prev)/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev). η = 0 is deterministic and needs no `noise`; η > 0 takes
    /// z from `noise` (standard normal, one value per element).
    pub fn ddim_step(
        &self,
        x: &[f32],
        eps: &[f32],
        t: usize,
        t_prev: Option<usize>,
        eta: f64,
        noise: Option<&[f32]>,
    ) -> Vec<f32> {
        let a_t = self.alphas_cumprod[t];
        let a_prev = t_prev.map_or(self.alphas_cumprod[0], |p| self.alphas_cumprod[p]);
        let sigma = eta * ((1.0 - a_prev) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_prev).sqrt();
        let (sa, s1a) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let (sp, dir) = (a_prev.sqrt(), (1.0 - a_prev - sigma * sigma).max(0.0).sqrt());
        x.iter()
            .zip(eps)
            .enumerate()
            .map(|(i, (&xv, &e))| {
                let x0 = (xv as f64 - s1a * e as f64) / sa;
                let z = if sigma == 0.0 { 0.0 } else { noise.map_or(0.0, |n| n[i] as f64) };
                (sp * x0 + dir * e as f64 + sigma * z) as f32
            })
            .collect()
    }
}
