//! SGD with momentum and AdamW, written on tensors so that their state can be
//! saved with a checkpoint and restored on resume (tch's built-in optimizers
//! keep their state inside libtorch, out of reach). The update rules are
//! PyTorch's `torch.optim.SGD` and `torch.optim.AdamW`.

use tch::{Kind, Tensor};
use vtp_core::Result;

use super::amp::GradScaler;
use super::torch_err;
use vtp_core::OptimizerKind;

fn t(r: std::result::Result<Tensor, tch::TchError>) -> Result<Tensor> {
    r.map_err(torch_err)
}

/// A 0-dim tensor holding `value`, on `like`'s device and kind.
fn scalar(value: f64, like: &Tensor) -> Result<Tensor> {
    t(Tensor::f_scalar_tensor(value, (like.kind(), like.device())))
}

/// For in-place ops, whose returned handle is not needed.
fn done(r: std::result::Result<Tensor, tch::TchError>) -> Result<()> {
    r.map(drop).map_err(torch_err)
}

/// Which parameter group a parameter belongs to: groups differ in weight
/// decay and (during a detection warm-up) in learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamGroup {
    /// Convolution and linear weights: decayed.
    Weights = 0,
    /// Normalisation weights: not decayed.
    Norm = 1,
    /// Biases: not decayed, with their own warm-up learning rate.
    Bias = 2,
}

/// An optimizer over a fixed list of named parameters.
#[derive(Debug)]
pub struct Optimizer {
    kind: OptimizerKind,
    /// Learning rate per [`ParamGroup`].
    lr: [f64; 3],
    momentum: f64,
    weight_decay: f64,
    betas: (f64, f64),
    eps: f64,
    step: i64,
    params: Vec<(String, Tensor)>,
    /// Per parameter: its group; only [`ParamGroup::Weights`] is decayed
    /// when groups are in use.
    groups: Vec<ParamGroup>,
    /// Whether groups decide the weight decay (else every parameter is decayed).
    grouped: bool,
    /// Nesterov momentum for SGD.
    nesterov: bool,
    /// Per parameter: SGD `[momentum]`, AdamW `[exp_avg, exp_avg_sq]`.
    state: Vec<Vec<Tensor>>,
    /// Gradients summed by [`Optimizer::accumulate`] since the last step.
    pending: Option<Vec<Tensor>>,
    /// Scales the loss of [`Optimizer::accumulate`] and checks the
    /// gradients of [`Optimizer::step_accumulated`] (float16 training).
    scaler: Option<GradScaler>,
}

impl Optimizer {
    /// An optimizer for `params` (name, tensor), sorted by name for a stable layout.
    pub fn new(
        kind: OptimizerKind,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        mut params: Vec<(String, Tensor)>,
    ) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = match kind {
            // The trainer resolves `auto` before it builds an optimizer.
            OptimizerKind::Sgd | OptimizerKind::Auto => 1,
            OptimizerKind::Adamw => 2,
        };
        let state = params
            .iter()
            .map(|(_, p)| (0..slots).map(|_| p.zeros_like()).collect())
            .collect();
        let groups = vec![ParamGroup::Weights; params.len()];
        Optimizer {
            kind,
            lr: [lr; 3],
            momentum,
            weight_decay,
            betas: (0.9, 0.999),
            eps: 1e-8,
            step: 0,
            params,
            groups,
            grouped: false,
            nesterov: false,
            state,
            pending: None,
            scaler: None,
        }
    }

    /// Scales losses and checks gradients with `scaler` from now on
    /// (mixed precision in float16).
    pub fn set_grad_scaler(&mut self, scaler: GradScaler) {
        self.scaler = Some(scaler);
    }

    /// The gradient scaler, if there is one.
    pub fn grad_scaler(&self) -> Option<&GradScaler> {
        self.scaler.as_ref()
    }

    /// Like [`Optimizer::new`], with each parameter put in the group
    /// `group_of(name, tensor)` names: only [`ParamGroup::Weights`] is
    /// decayed, and [`Optimizer::set_group_lr`] sets a group's rate. SGD
    /// uses Nesterov momentum and for AdamW `momentum` is beta1, as
    /// Ultralytics builds its optimizers.
    pub fn grouped(
        kind: OptimizerKind,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        params: Vec<(String, Tensor)>,
        group_of: impl Fn(&str, &Tensor) -> ParamGroup,
    ) -> Self {
        let mut optimizer = Optimizer::new(kind, lr, momentum, weight_decay, params);
        optimizer.groups = optimizer
            .params
            .iter()
            .map(|(name, p)| group_of(name, p))
            .collect();
        optimizer.grouped = true;
        optimizer.nesterov = true;
        optimizer.betas.0 = momentum;
        optimizer
    }

    /// Sets the learning rate of one group.
    pub fn set_group_lr(&mut self, group: ParamGroup, lr: f64) {
        self.lr[group as usize] = lr;
    }

    /// The learning rate of one group.
    pub fn group_lr(&self, group: ParamGroup) -> f64 {
        self.lr[group as usize]
    }

    /// Sets SGD's momentum (warm-up ramps it). AdamW's beta1 is set once,
    /// by [`Optimizer::grouped`]: Ultralytics' warm-up leaves it alone.
    pub fn set_momentum(&mut self, momentum: f64) {
        self.momentum = momentum;
    }

    /// Back-propagates `loss` and adds the gradients to those held since the
    /// last [`Optimizer::step_accumulated`] (gradient accumulation over
    /// several batches, as a nominal batch size asks). With a gradient
    /// scaler, the scaled loss is back-propagated.
    ///
    /// # Errors
    /// libtorch failures.
    pub fn accumulate(&mut self, loss: &Tensor) -> Result<()> {
        let grads = match &self.scaler {
            Some(scaler) => self.gradients(&scaler.scale(loss)?)?,
            None => self.gradients(loss)?,
        };
        match &mut self.pending {
            None => self.pending = Some(grads),
            Some(held) => {
                for (sum, grad) in held.iter_mut().zip(grads) {
                    if !grad.defined() {
                        continue;
                    }
                    if sum.defined() {
                        done(sum.f_add_(&grad))?;
                    } else {
                        *sum = grad;
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies the accumulated gradients, first scaling them so that their
    /// total L2 norm is at most `max_norm` (PyTorch's `clip_grad_norm_`).
    /// Nothing happens when nothing was accumulated. With a gradient
    /// scaler, the gradients are unscaled first, and a step whose gradients
    /// are not finite is skipped (as `GradScaler.step` skips it) and the
    /// scale backed off.
    ///
    /// # Errors
    /// libtorch failures.
    pub fn step_accumulated(&mut self, max_norm: Option<f64>) -> Result<()> {
        let Some(mut grads) = self.pending.take() else {
            return Ok(());
        };
        if let Some(scaler) = &mut self.scaler {
            let finite = scaler.unscale(&mut grads)?;
            scaler.update(finite)?;
            if !finite {
                return Ok(());
            }
        }
        if let Some(max_norm) = max_norm {
            let norms: Vec<Tensor> = grads
                .iter()
                .filter(|g| g.defined())
                .map(|g| g.f_norm().map_err(torch_err))
                .collect::<Result<_>>()?;
            if !norms.is_empty() {
                let total = t(t(Tensor::f_stack(&norms, 0))?.f_norm())?
                    .f_double_value(&[])
                    .map_err(torch_err)?;
                let coef = max_norm / (total + 1e-6);
                if coef < 1.0 {
                    for g in grads.iter_mut().filter(|g| g.defined()) {
                        done(g.f_mul_scalar_(coef))?;
                    }
                }
            }
        }
        self.apply(grads)
    }

    /// Gradients of `loss` for every parameter (undefined where frozen or
    /// unused), each a private buffer the update may write into.
    fn gradients(&self, loss: &Tensor) -> Result<Vec<Tensor>> {
        let trainable: Vec<usize> = (0..self.params.len())
            .filter(|&i| self.params[i].1.requires_grad())
            .collect();
        let inputs: Vec<&Tensor> = trainable.iter().map(|&i| &self.params[i].1).collect();
        let returned = Tensor::f_run_backward(&[loss], &inputs, false, false).map_err(torch_err)?;
        let mut grads: Vec<Tensor> = self.params.iter().map(|_| Tensor::new()).collect();
        // The update writes into each gradient. Autograd may hand the same
        // buffer to two parameters, or an expanded (overlapping) view; those
        // are copied first, the rest are used as they are.
        let mut buffers = std::collections::HashSet::new();
        for (i, grad) in trainable.into_iter().zip(returned) {
            let private = !grad.defined()
                || (grad.is_contiguous() && buffers.insert(grad.data_ptr() as usize));
            grads[i] = if private { grad } else { grad.copy() };
        }
        Ok(grads)
    }

    /// Steps taken.
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// Sets the learning rate (for schedules).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = [lr; 3];
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            let mut grad = p.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    }

    /// Applies one update from the gradients accumulated in each
    /// parameter's `.grad` (by `loss.backward()`, after [`Optimizer::zero_grad`]).
    ///
    /// # Errors
    /// libtorch failures.
    pub fn step(&mut self) -> Result<()> {
        let grads = self.params.iter().map(|(_, p)| p.grad()).collect();
        self.apply(grads)
    }

    /// Back-propagates `loss` and applies one update: the training step.
    ///
    /// Autograd hands the gradients back as fresh tensors (as
    /// `torch.autograd.grad` does) instead of accumulating them into each
    /// parameter's `.grad`, so a step makes no zeroing pass and no
    /// accumulation pass over the parameters (PyTorch's
    /// `zero_grad(set_to_none=True)` saves the same work); `.grad` is left
    /// untouched. As with `set_to_none`, a parameter that `loss` does not
    /// depend on gets no update at all (no momentum, no weight decay), and a
    /// frozen one (`requires_grad` false) is skipped.
    ///
    /// # Errors
    /// libtorch failures (a `loss` that does not require gradients).
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = self.gradients(loss)?;
        self.apply(grads)
    }

    /// One update with `grads`, one per parameter (undefined: no gradient).
    fn apply(&mut self, grads: Vec<Tensor>) -> Result<()> {
        self.step += 1;
        let momentum = self.momentum;
        let (b1, b2) = self.betas;
        let steps = self.step as f64;
        let (bias1, bias2) = (1.0 - b1.powf(steps), 1.0 - b2.powf(steps));
        tch::no_grad(|| -> Result<()> {
            for ((((_, p), state), grad), &group) in self
                .params
                .iter_mut()
                .zip(&mut self.state)
                .zip(grads)
                .zip(&self.groups)
            {
                if !grad.defined() {
                    continue;
                }
                let lr = self.lr[group as usize];
                let wd = if !self.grouped || group == ParamGroup::Weights {
                    self.weight_decay
                } else {
                    0.0
                };
                // Every update is in place: scale factors ride on 0-dim
                // tensors through `addcmul_`/`addcdiv_`, so a step allocates
                // almost nothing (large allocations cost page faults on CPU).
                match self.kind {
                    OptimizerKind::Sgd | OptimizerKind::Auto => {
                        let mut grad = grad;
                        if wd != 0.0 {
                            done(grad.f_addcmul_(p, &scalar(wd, p)?))?;
                        }
                        if momentum == 0.0 {
                            done(p.f_addcmul_(&grad, &scalar(-lr, p)?))?;
                        } else {
                            let buf = &mut state[0];
                            done(buf.f_mul_scalar_(momentum))?;
                            done(buf.f_add_(&grad))?;
                            if self.nesterov {
                                // PyTorch's nesterov: step along g + momentum * buf.
                                done(grad.f_addcmul_(buf, &scalar(momentum, p)?))?;
                                done(p.f_addcmul_(&grad, &scalar(-lr, p)?))?;
                            } else {
                                done(p.f_addcmul_(buf, &scalar(-lr, p)?))?;
                            }
                        }
                    }
                    OptimizerKind::Adamw => {
                        let mut grad = grad;
                        if wd != 0.0 {
                            done(p.f_mul_scalar_(1.0 - lr * wd))?;
                        }
                        let (m, v) = state.split_at_mut(1);
                        let (m, v) = (&mut m[0], &mut v[0]);
                        done(m.f_lerp_(&grad, 1.0 - b1))?;
                        // v = b2 v + (1 - b2) g^2, with g scaled in place (it is not needed after).
                        done(v.f_mul_scalar_(b2))?;
                        done(grad.f_mul_scalar_((1.0 - b2).sqrt()))?;
                        done(v.f_addcmul_(&grad, &grad))?;
                        // p -= lr / bias1 * m / (sqrt(v / bias2) + eps)
                        let mut denom = t(v.f_sqrt())?;
                        done(denom.f_mul_scalar_(1.0 / bias2.sqrt()))?;
                        done(denom.f_add_scalar_(self.eps))?;
                        done(denom.f_mul_scalar_(-bias1 / lr))?;
                        done(p.f_addcdiv_(m, &denom))?;
                    }
                }
            }
            Ok(())
        })
    }

    /// The state as named tensors (for a checkpoint), plus the step count
    /// and any gradient scaler's state.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("step".to_owned(), Tensor::from_slice(&[self.step]))];
        if let Some(scaler) = &self.scaler {
            out.extend(scaler.state_tensors());
        }
        for ((name, _), state) in self.params.iter().zip(&self.state) {
            for (i, t) in state.iter().enumerate() {
                out.push((format!("{name}.{i}"), t.to_device(tch::Device::Cpu)));
            }
        }
        out
    }

    /// Restores what [`Optimizer::state_tensors`] saved.
    ///
    /// # Errors
    /// [`vtp_core::Error::InvalidInput`] when the state belongs to another model or optimizer.
    pub fn load_state(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        let find = |key: &str| named.iter().find(|(n, _)| n == key).map(|(_, t)| t);
        let mismatch = |what: String| {
            vtp_core::Error::invalid(
                "checkpoint",
                format!("optimizer state does not fit: {what}"),
            )
        };
        let step = find("step").ok_or_else(|| mismatch("no step".into()))?;
        self.step = step.f_int64_value(&[0]).map_err(torch_err)?;
        if let Some(scaler) = &mut self.scaler {
            scaler.load_state(named)?;
        }
        tch::no_grad(|| -> Result<()> {
            for ((name, p), state) in self.params.iter().zip(&mut self.state) {
                for (i, slot) in state.iter_mut().enumerate() {
                    let saved = find(&format!("{name}.{i}"))
                        .ok_or_else(|| mismatch(format!("{name}.{i} missing")))?;
                    if saved.size() != p.size() {
                        return Err(mismatch(format!(
                            "{name}.{i} has shape {:?}, expected {:?}",
                            saved.size(),
                            p.size()
                        )));
                    }
                    slot.f_copy_(&saved.to_kind(Kind::Float).to_device(p.device()))
                        .map_err(torch_err)?;
                }
            }
            Ok(())
        })
    }
}
