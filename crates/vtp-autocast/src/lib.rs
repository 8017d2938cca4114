//! libtorch's autocast on every device type: inside an [`Autocast`] region,
//! the operations PyTorch lists as safe in lower precision (convolutions,
//! matrix products) run in bfloat16 on CPU or float16 on CUDA, and the rest
//! in float32, exactly as `with torch.autocast(device_type, dtype):` does.
//!
//! tch 0.26 binds only libtorch's CUDA autocast switch; this crate binds the
//! per-device one through a small C++ shim (`csrc/autocast.cpp`). It is the
//! workspace's one FFI boundary, so the unsafe code lives here and nowhere
//! else.
//!
//! Autocast state is per thread, as in PyTorch: a region covers the forward
//! passes run on the thread that entered it.

use std::fmt;

use tch::{Device, Kind};

/// What went wrong at the libtorch boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "autocast: {}", self.0)
    }
}

impl std::error::Error for Error {}

/// The lower precision autocast uses on `device`, as `torch.autocast`
/// defaults it: bfloat16 on CPU (float16 there is slow and, without
/// gradient scaling, overflows), float16 on CUDA (with a gradient scaler).
#[must_use]
pub fn default_dtype(device: Device) -> Kind {
    if device.is_cuda() {
        Kind::Half
    } else {
        Kind::BFloat16
    }
}

/// An autocast region on one device; dropping it restores the state it
/// found (regions nest, as `torch.autocast` contexts do).
pub struct Autocast {
    device: i32,
    was_enabled: i32,
    was_dtype: i32,
}

impl fmt::Debug for Autocast {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Autocast")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Autocast {
    /// Enters autocast on `device` with `dtype` (see [`default_dtype`]).
    ///
    /// # Errors
    /// A device type or dtype libtorch's autocast does not support
    /// (autocast on CPU takes bfloat16 or float16).
    pub fn enter(device: Device, dtype: Kind) -> Result<Autocast, Error> {
        let device = device_type(device)?;
        let dtype = scalar_type(dtype)?;
        let (mut was_enabled, mut was_dtype) = (0, 0);
        if ffi::set(device, 1, dtype, &mut was_enabled, &mut was_dtype) != 0 {
            return Err(Error(format!(
                "libtorch refused autocast on device type {device} with scalar type {dtype}"
            )));
        }
        ffi::enter();
        Ok(Autocast {
            device,
            was_enabled,
            was_dtype,
        })
    }

    /// Runs `f` inside an autocast region on `device` in `dtype`; with
    /// `dtype` `None`, runs it as it is.
    ///
    /// # Errors
    /// As [`Autocast::enter`].
    pub fn run<T>(dtype: Option<Kind>, device: Device, f: impl FnOnce() -> T) -> Result<T, Error> {
        let _region = dtype
            .map(|dtype| Autocast::enter(device, dtype))
            .transpose()?;
        Ok(f())
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        let (mut enabled, mut dtype) = (0, 0);
        // Restoring a state libtorch accepted before cannot fail.
        let _ = ffi::set(
            self.device,
            self.was_enabled,
            self.was_dtype,
            &mut enabled,
            &mut dtype,
        );
        ffi::exit();
    }
}

/// Whether autocast is on for `device` on this thread.
#[must_use]
pub fn is_enabled(device: Device) -> bool {
    device_type(device).is_ok_and(|device| ffi::is_enabled(device) == 1)
}

/// `c10::DeviceType` (c10/core/DeviceType.h).
fn device_type(device: Device) -> Result<i32, Error> {
    match device {
        Device::Cpu => Ok(0),
        Device::Cuda(_) => Ok(1),
        other => Err(Error(format!("no autocast on {other:?}"))),
    }
}

/// `c10::ScalarType` (c10/core/ScalarType.h) of the two lower precisions.
fn scalar_type(kind: Kind) -> Result<i32, Error> {
    match kind {
        Kind::Half => Ok(5),
        Kind::BFloat16 => Ok(15),
        other => Err(Error(format!(
            "autocast runs in float16 or bfloat16, not {other:?}"
        ))),
    }
}

#[allow(unsafe_code)]
mod ffi {
    //! The shim's functions (csrc/autocast.cpp); each catches every C++
    //! exception and returns -1 instead.
    use std::os::raw::c_int;

    unsafe extern "C" {
        fn vtp_autocast_set(
            device: c_int,
            enabled: c_int,
            dtype: c_int,
            was_enabled: *mut c_int,
            was_dtype: *mut c_int,
        ) -> c_int;
        fn vtp_autocast_is_enabled(device: c_int) -> c_int;
        fn vtp_autocast_enter() -> c_int;
        fn vtp_autocast_exit() -> c_int;
    }

    pub(super) fn set(
        device: c_int,
        enabled: c_int,
        dtype: c_int,
        was_enabled: &mut c_int,
        was_dtype: &mut c_int,
    ) -> c_int {
        // SAFETY: plain integers in, two valid out-pointers from references.
        unsafe { vtp_autocast_set(device, enabled, dtype, was_enabled, was_dtype) }
    }

    pub(super) fn is_enabled(device: c_int) -> c_int {
        // SAFETY: an integer in, an integer out.
        unsafe { vtp_autocast_is_enabled(device) }
    }

    pub(super) fn enter() -> c_int {
        // SAFETY: no arguments; the shim catches libtorch's exceptions.
        unsafe { vtp_autocast_enter() }
    }

    pub(super) fn exit() -> c_int {
        // SAFETY: no arguments; the shim catches libtorch's exceptions.
        unsafe { vtp_autocast_exit() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    fn matmul_kind() -> Kind {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        a.matmul(&a).kind()
    }

    #[test]
    fn a_region_runs_matmuls_in_bfloat16_on_cpu_and_restores_on_drop() {
        assert_eq!(matmul_kind(), Kind::Float);
        assert!(!is_enabled(Device::Cpu));
        {
            let _outer = Autocast::enter(Device::Cpu, Kind::BFloat16).unwrap();
            assert!(is_enabled(Device::Cpu));
            assert_eq!(matmul_kind(), Kind::BFloat16);
            {
                let _inner = Autocast::enter(Device::Cpu, Kind::BFloat16).unwrap();
                assert_eq!(matmul_kind(), Kind::BFloat16);
            }
            // The inner region restored the outer one's state, not "off".
            assert!(is_enabled(Device::Cpu));
            // Ops on autocast's float32 list stay float32 inside a region.
            let x = Tensor::ones([4], (Kind::BFloat16, Device::Cpu));
            let y = Tensor::ones([4], (Kind::Float, Device::Cpu));
            let loss = x.mse_loss(&y, tch::Reduction::Mean);
            assert_eq!(loss.kind(), Kind::Float);
        }
        assert!(!is_enabled(Device::Cpu));
        assert_eq!(matmul_kind(), Kind::Float);
    }

    #[test]
    fn run_without_a_dtype_changes_nothing() {
        let kind = Autocast::run(None, Device::Cpu, matmul_kind).unwrap();
        assert_eq!(kind, Kind::Float);
        let kind =
            Autocast::run(Some(default_dtype(Device::Cpu)), Device::Cpu, matmul_kind).unwrap();
        assert_eq!(kind, Kind::BFloat16);
    }

    #[test]
    fn an_unsupported_dtype_is_an_error_not_a_crash() {
        let err = Autocast::enter(Device::Cpu, Kind::Double).unwrap_err();
        assert!(err.to_string().contains("float16 or bfloat16"), "{err}");
        assert!(!is_enabled(Device::Cpu));
    }
}
