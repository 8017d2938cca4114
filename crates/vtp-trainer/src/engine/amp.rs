//! Mixed precision (`config.amp`), as `torch.autocast` and
//! `torch.amp.GradScaler` do it: the forward pass runs under libtorch's
//! autocast ([`vtp_autocast`]) in bfloat16 on CPU or float16 on CUDA, the
//! loss and the weights stay float32, and on CUDA a [`GradScaler`] keeps
//! float16 gradients from underflowing.

use tch::{Device, Kind, Tensor};
use vtp_autocast::Autocast;
use vtp_core::{Error, Result};

use super::torch_err;

/// The run's precision: how the loop runs a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amp {
    device: Device,
    /// The lower precision, when `amp` is on.
    dtype: Option<Kind>,
}

impl Amp {
    /// Mixed precision on `device` when `enabled`: bfloat16 on CPU, float16 on CUDA.
    #[must_use]
    pub fn new(enabled: bool, device: Device) -> Self {
        Amp {
            device,
            dtype: enabled.then(|| vtp_autocast::default_dtype(device)),
        }
    }

    /// Full precision.
    #[must_use]
    pub fn off(device: Device) -> Self {
        Amp::new(false, device)
    }

    /// The lower precision, or `None` in full precision.
    #[must_use]
    pub fn dtype(&self) -> Option<Kind> {
        self.dtype
    }

    /// Whether gradients need a [`GradScaler`]: float16's range is too
    /// narrow for small gradients; bfloat16 has float32's.
    #[must_use]
    pub fn needs_scaler(&self) -> bool {
        self.dtype == Some(Kind::Half)
    }

    /// Runs `forward` under autocast when mixed precision is on. The
    /// outputs may be in the lower precision: a task computes its loss on
    /// them cast to float32 ([`Amp::full`]).
    ///
    /// # Errors
    /// libtorch refusing autocast on the device.
    pub fn forward<T>(&self, forward: impl FnOnce() -> T) -> Result<T> {
        Autocast::run(self.dtype, self.device, forward)
            .map_err(|e| Error::backend("libtorch", e.to_string()))
    }

    /// `output` in float32 (itself, unchanged, in full precision).
    ///
    /// # Errors
    /// libtorch failures.
    pub fn full(output: &Tensor) -> Result<Tensor> {
        if output.kind() == Kind::Float {
            return Ok(output.shallow_clone());
        }
        output.f_to_kind(Kind::Float).map_err(torch_err)
    }
}

/// PyTorch's `GradScaler`: the loss is multiplied by a scale before
/// back-propagation, so small float16 gradients do not flush to zero; the
/// gradients are divided by it again before the update. A step whose
/// gradients hold an infinity or a NaN is skipped and the scale halved;
/// after `growth_interval` steps in a row without one, the scale doubles.
/// The bookkeeping is libtorch's own `_amp_update_scale_`.
#[derive(Debug)]
pub struct GradScaler {
    /// One float32 element.
    scale: Tensor,
    /// Finite steps in a row since the scale last changed (one int32).
    growth_tracker: Tensor,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: i64,
    /// Steps skipped for non-finite gradients.
    skipped: u64,
}

impl GradScaler {
    /// PyTorch's defaults: an initial scale of 2^16, doubled after 2000
    /// finite steps, halved on an overflow.
    #[must_use]
    pub fn new(device: Device) -> Self {
        GradScaler::with(device, 65536.0, 2000)
    }

    /// A scaler starting at `init_scale` that grows after `growth_interval`
    /// finite steps.
    #[must_use]
    pub fn with(device: Device, init_scale: f64, growth_interval: i64) -> Self {
        GradScaler {
            scale: Tensor::from_slice(&[init_scale as f32]).to_device(device),
            growth_tracker: Tensor::from_slice(&[0i32]).to_device(device),
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval,
            skipped: 0,
        }
    }

    /// The current scale.
    ///
    /// # Errors
    /// libtorch failures.
    pub fn scale_value(&self) -> Result<f64> {
        self.scale.f_double_value(&[0]).map_err(torch_err)
    }

    /// Steps skipped so far for non-finite gradients.
    #[must_use]
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// `loss` times the scale: what to back-propagate.
    ///
    /// # Errors
    /// libtorch failures.
    pub fn scale(&self, loss: &Tensor) -> Result<Tensor> {
        let scale = self.scale.f_to_kind(loss.kind()).map_err(torch_err)?;
        loss.f_mul(&scale.f_squeeze().map_err(torch_err)?)
            .map_err(torch_err)
    }

    /// Divides `grads` (undefined ones are skipped) by the scale in place;
    /// false when any of them holds an infinity or a NaN (the step must be
    /// skipped).
    ///
    /// # Errors
    /// libtorch failures.
    pub fn unscale(&self, grads: &mut [Tensor]) -> Result<bool> {
        let inv = self
            .scale
            .f_to_kind(Kind::Double)
            .and_then(|s| s.f_reciprocal())
            .map_err(torch_err)?
            .f_double_value(&[0])
            .map_err(torch_err)?;
        let mut bad = Vec::new();
        tch::no_grad(|| -> Result<()> {
            for grad in grads.iter_mut().filter(|g| g.defined()) {
                grad.f_mul_scalar_(inv).map(drop).map_err(torch_err)?;
                let finite = grad
                    .f_isfinite()
                    .and_then(|f| f.f_all())
                    .map_err(torch_err)?;
                bad.push(finite.f_logical_not().map_err(torch_err)?);
            }
            Ok(())
        })?;
        if bad.is_empty() {
            return Ok(true);
        }
        let any_bad = Tensor::f_stack(&bad, 0)
            .and_then(|b| b.f_any())
            .map_err(torch_err)?;
        Ok(!bool::try_from(&any_bad).map_err(torch_err)?)
    }

    /// After a step: backs off when `finite` is false (and counts the
    /// skipped step), else counts towards growth.
    ///
    /// # Errors
    /// libtorch failures.
    pub fn update(&mut self, finite: bool) -> Result<()> {
        let found_inf =
            Tensor::from_slice(&[if finite { 0.0f32 } else { 1.0 }]).to_device(self.scale.device());
        self.scale
            .f_internal_amp_update_scale_(
                &self.growth_tracker,
                &found_inf,
                self.growth_factor,
                self.backoff_factor,
                self.growth_interval,
            )
            .map(drop)
            .map_err(torch_err)?;
        if !finite {
            self.skipped += 1;
        }
        Ok(())
    }

    /// The scale and growth tracker, for a checkpoint.
    #[must_use]
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            (
                "grad_scaler.scale".to_owned(),
                self.scale.to_device(Device::Cpu),
            ),
            (
                "grad_scaler.growth_tracker".to_owned(),
                self.growth_tracker.to_device(Device::Cpu),
            ),
        ]
    }

    /// Restores what [`GradScaler::state_tensors`] saved; a checkpoint
    /// without them (saved in full precision) leaves the scaler as it is.
    ///
    /// # Errors
    /// libtorch failures.
    pub fn load_state(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        for (key, slot) in [
            ("grad_scaler.scale", &mut self.scale),
            ("grad_scaler.growth_tracker", &mut self.growth_tracker),
        ] {
            if let Some((_, saved)) = named.iter().find(|(n, _)| n == key) {
                tch::no_grad(|| slot.f_copy_(saved))
                    .map(drop)
                    .map_err(torch_err)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grads(values: &[f32]) -> Vec<Tensor> {
        values
            .iter()
            .map(|&v| Tensor::from_slice(&[v, 2.0 * v]))
            .collect()
    }

    #[test]
    fn unscale_divides_by_the_scale_and_finds_infinities_and_nans() {
        let scaler = GradScaler::with(Device::Cpu, 1024.0, 3);
        let mut finite = grads(&[1024.0, 512.0]);
        assert!(scaler.unscale(&mut finite).unwrap());
        assert_eq!(Vec::<f32>::try_from(&finite[0]).unwrap(), [1.0, 2.0]);
        assert_eq!(Vec::<f32>::try_from(&finite[1]).unwrap(), [0.5, 1.0]);
        for poison in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let mut bad = grads(&[1.0, poison]);
            bad.insert(0, Tensor::new());
            assert!(!scaler.unscale(&mut bad).unwrap(), "{poison}");
        }
        assert!(scaler.unscale(&mut [Tensor::new()]).unwrap());
    }

    #[test]
    fn an_overflow_halves_the_scale_and_finite_steps_grow_it_after_the_interval() {
        let mut scaler = GradScaler::with(Device::Cpu, 1024.0, 3);
        scaler.update(false).unwrap();
        assert_eq!(scaler.scale_value().unwrap(), 512.0);
        assert_eq!(scaler.skipped(), 1);
        // Two finite steps: not yet the interval.
        scaler.update(true).unwrap();
        scaler.update(true).unwrap();
        assert_eq!(scaler.scale_value().unwrap(), 512.0);
        // An overflow resets the count.
        scaler.update(false).unwrap();
        assert_eq!(scaler.scale_value().unwrap(), 256.0);
        for _ in 0..3 {
            scaler.update(true).unwrap();
        }
        assert_eq!(scaler.scale_value().unwrap(), 512.0);
        assert_eq!(scaler.skipped(), 2);
        // The state survives a checkpoint.
        let mut restored = GradScaler::with(Device::Cpu, 65536.0, 3);
        restored.load_state(&scaler.state_tensors()).unwrap();
        assert_eq!(restored.scale_value().unwrap(), 512.0);
    }

    /// An optimizer with a scaler skips a step whose scaled gradients
    /// overflow (leaving the weights, the step count and the momentum
    /// alone), backs the scale off, and takes the next finite step with the
    /// gradients unscaled exactly.
    #[test]
    fn an_optimizer_skips_an_overflowing_step_and_applies_the_next_unscaled() {
        use super::super::optim::Optimizer;
        use vtp_core::OptimizerKind;
        let p = Tensor::from_slice(&[1.0f32, -1.0]).set_requires_grad(true);
        let mut opt = Optimizer::new(
            OptimizerKind::Sgd,
            0.1,
            0.9,
            0.0,
            vec![("w".into(), p.shallow_clone())],
        );
        opt.set_grad_scaler(GradScaler::with(Device::Cpu, 65536.0, 2000));
        // The gradient 1e38 times the scale is infinite in float32.
        let overflowing = (&p * 1e38).sum(Kind::Float);
        opt.accumulate(&overflowing).unwrap();
        opt.step_accumulated(None).unwrap();
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), [1.0, -1.0]);
        assert_eq!(opt.steps(), 0);
        let scaler = opt.grad_scaler().unwrap();
        assert_eq!(
            (scaler.scale_value().unwrap(), scaler.skipped()),
            (32768.0, 1)
        );
        // A finite step: the gradient (3, 3) is unscaled before SGD applies it.
        let finite = (&p * 3.0).sum(Kind::Float);
        opt.accumulate(&finite).unwrap();
        opt.step_accumulated(None).unwrap();
        let after = Vec::<f32>::try_from(&p).unwrap();
        assert!(
            (after[0] - 0.7).abs() < 1e-6 && (after[1] + 1.3).abs() < 1e-6,
            "{after:?}"
        );
        assert_eq!(opt.steps(), 1);
        // The scaler's state travels with the optimizer's.
        let names: Vec<String> = opt.state_tensors().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"grad_scaler.scale".to_owned()), "{names:?}");
    }

    #[test]
    fn the_loss_is_scaled_in_its_own_kind() {
        let scaler = GradScaler::with(Device::Cpu, 8.0, 3);
        let loss = Tensor::from(0.25f32);
        let scaled = scaler.scale(&loss).unwrap();
        assert_eq!(scaled.size(), Vec::<i64>::new());
        assert_eq!(scaled.double_value(&[]), 2.0);
    }

    #[test]
    fn amp_picks_bfloat16_on_cpu_and_only_float16_needs_a_scaler() {
        let amp = Amp::new(true, Device::Cpu);
        assert_eq!(amp.dtype(), Some(Kind::BFloat16));
        assert!(!amp.needs_scaler());
        assert_eq!(Amp::new(true, Device::Cuda(0)).dtype(), Some(Kind::Half));
        assert!(Amp::new(true, Device::Cuda(0)).needs_scaler());
        assert_eq!(Amp::off(Device::Cpu).dtype(), None);
        let x = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([3, 4], (Kind::Float, Device::Cpu));
        let y = amp.forward(|| x.matmul(&w)).unwrap();
        assert_eq!(y.kind(), Kind::BFloat16);
        assert_eq!(Amp::full(&y).unwrap().kind(), Kind::Float);
        let y = Amp::off(Device::Cpu).forward(|| x.matmul(&w)).unwrap();
        assert_eq!(y.kind(), Kind::Float);
    }
}
